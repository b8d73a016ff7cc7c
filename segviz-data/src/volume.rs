//! In-memory 3-D volumes with their geometry.

/// The geometry of a volume: its shape and the affine that maps voxel indices to world
/// coordinates in millimetres (NIfTI convention: world axes are RAS+).
#[derive(Debug, Clone, PartialEq)]
pub struct Geometry {
    /// Number of voxels along the index axes `[i, j, k]`.
    pub shape: [usize; 3],
    /// Row-major 4×4 affine: `world = affine · [i, j, k, 1]ᵀ`.
    pub affine: [[f64; 4]; 4],
}

impl Geometry {
    /// A geometry with axis-aligned RAS axes, the given spacing (mm) and origin at zero.
    pub fn from_spacing(shape: [usize; 3], spacing: [f64; 3]) -> Self {
        let mut affine = [[0.0; 4]; 4];
        for (a, s) in spacing.iter().enumerate() {
            affine[a][a] = *s;
        }
        affine[3][3] = 1.0;
        Geometry { shape, affine }
    }

    /// Voxel spacing in millimetres along each index axis (norm of each affine column).
    pub fn spacing(&self) -> [f64; 3] {
        let mut s = [0.0; 3];
        for (c, v) in s.iter_mut().enumerate() {
            *v = (0..3)
                .map(|r| self.affine[r][c] * self.affine[r][c])
                .sum::<f64>()
                .sqrt();
        }
        s
    }

    /// Total number of voxels.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether the volume has no voxel.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Linear index of voxel `[i, j, k]` (C order, `k` fastest).
    #[inline]
    pub fn index(&self, i: usize, j: usize, k: usize) -> usize {
        (i * self.shape[1] + j) * self.shape[2] + k
    }
}

/// A 3-D volume: voxel values in C order over `[i, j, k]` (`k` fastest) and its geometry.
///
/// Images are `Volume<f32>` (Hounsfield units, or [0, 1] after windowing); label maps are
/// `Volume<u8>`.
#[derive(Debug, Clone, PartialEq)]
pub struct Volume<T = f32> {
    /// Voxel values, `geometry.len()` of them.
    pub data: Vec<T>,
    /// Shape and affine.
    pub geometry: Geometry,
}

impl<T: Copy> Volume<T> {
    /// A volume filled with `value`.
    pub fn filled(geometry: Geometry, value: T) -> Self {
        Volume {
            data: vec![value; geometry.len()],
            geometry,
        }
    }

    /// The shape `[i, j, k]`.
    pub fn shape(&self) -> [usize; 3] {
        self.geometry.shape
    }

    /// The voxel at `[i, j, k]`.
    ///
    /// # Panics
    /// If the index is outside the volume (a programmer error).
    #[inline]
    pub fn at(&self, i: usize, j: usize, k: usize) -> T {
        self.data[self.geometry.index(i, j, k)]
    }
}
