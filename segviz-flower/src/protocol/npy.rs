//! The `.npy` bytes Flower carries in an `Array` (NumPy's format, version 1.0): written by
//! hand because we only need C-ordered little-endian `float32` (and read `float64`), and
//! the format is a short header plus raw values.

use crate::error::{FlowerError, Result};

const MAGIC: &[u8] = b"\x93NUMPY";

/// `values` (C order) with `shape` as `.npy` bytes of dtype `<f4`.
pub fn encode_f32(shape: &[usize], values: &[f32]) -> Vec<u8> {
    let dims = match shape.len() {
        0 => "()".to_string(),
        1 => format!("({},)", shape[0]),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {dims}, }}");
    // NumPy pads the header with spaces so the data starts on a multiple of 64 bytes.
    let unpadded = MAGIC.len() + 2 + 2 + header.len() + 1;
    header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(MAGIC.len() + 4 + header.len() + 4 * values.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// Decodes `.npy` bytes of a little-endian `float32` or `float64` array in C order into
/// `(shape, values as f32)`.
pub fn decode_f32(bytes: &[u8]) -> Result<(Vec<usize>, Vec<f32>)> {
    let bad = |why: &str| FlowerError::protocol(format!("array is not a usable .npy: {why}"));
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err(bad("missing the NUMPY magic"));
    }
    let (header_len, header_start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        v => return Err(bad(&format!("unsupported format version {v}"))),
    };
    let data_start = header_start + header_len;
    let header = bytes
        .get(header_start..data_start)
        .and_then(|h| std::str::from_utf8(h).ok())
        .ok_or_else(|| bad("truncated header"))?;
    let field = |key: &str| -> Option<&str> {
        let at = header.find(&format!("'{key}':"))? + key.len() + 3;
        Some(header[at..].trim_start())
    };
    let descr = field("descr").ok_or_else(|| bad("no descr"))?;
    let width = if descr.starts_with("'<f4'") {
        4
    } else if descr.starts_with("'<f8'") {
        8
    } else {
        return Err(bad(&format!(
            "dtype {} (only little-endian float32/float64)",
            descr.split(',').next().unwrap_or(descr)
        )));
    };
    if field("fortran_order").is_some_and(|f| f.starts_with("True")) {
        return Err(bad("Fortran order"));
    }
    let shape_text = field("shape").ok_or_else(|| bad("no shape"))?;
    let close = shape_text.find(')').ok_or_else(|| bad("malformed shape"))?;
    let shape = shape_text[1..close]
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>().map_err(|_| bad("malformed shape")))
        .collect::<Result<Vec<usize>>>()?;
    let count: usize = shape.iter().product();
    let data = &bytes[data_start..];
    if data.len() != count * width {
        return Err(bad(&format!(
            "{} data bytes for shape {shape:?} of {width}-byte values",
            data.len()
        )));
    }
    let values = if width == 4 {
        data.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    } else {
        data.chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f32)
            .collect()
    };
    Ok((shape, values))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_aligns_the_data_on_64_bytes() {
        for shape in [vec![], vec![3], vec![2, 3, 4]] {
            let n: usize = shape.iter().product();
            let values: Vec<f32> = (0..n).map(|i| i as f32 * 0.5 - 1.0).collect();
            let bytes = encode_f32(&shape, &values);
            assert_eq!((bytes.len() - 4 * n) % 64, 0);
            assert_eq!(decode_f32(&bytes).unwrap(), (shape, values));
        }
    }

    #[test]
    fn reads_what_numpy_writes() {
        // np.save(b, np.arange(3, dtype=np.float64).reshape(1, 3)) with NumPy 2.4.
        let mut bytes = b"\x93NUMPY\x01\x00v\x00".to_vec();
        let mut header = "{'descr': '<f8', 'fortran_order': False, 'shape': (1, 3), }".to_string();
        header.push_str(&" ".repeat(118 - header.len() - 1));
        header.push('\n');
        bytes.extend_from_slice(header.as_bytes());
        for v in [0.0f64, 1.0, 2.0] {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        assert_eq!(
            decode_f32(&bytes).unwrap(),
            (vec![1, 3], vec![0.0, 1.0, 2.0])
        );
    }

    #[test]
    fn refuses_truncated_data_and_other_dtypes() {
        let bytes = encode_f32(&[4], &[1.0, 2.0, 3.0, 4.0]);
        assert!(decode_f32(&bytes[..bytes.len() - 1]).is_err());
        let ints = String::from_utf8_lossy(&bytes).replace("<f4", "<i4");
        assert!(decode_f32(ints.as_bytes()).is_err());
        assert!(decode_f32(b"not numpy").is_err());
    }
}
