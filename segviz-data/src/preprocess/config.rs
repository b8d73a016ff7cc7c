//! The preprocessing recipe, as one serialisable value (it is also part of the cache key).

use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};

/// How a CT volume and its label map are prepared for the network (the authors' MONAI
/// transforms: `Orientation("RAS")`, `Spacing(pixdim)`, `ScaleIntensityRange(a_min, a_max,
/// 0, 1, clip)`, then `CropForeground` or `Resize`, and padding to a multiple of 16).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PreprocessConfig {
    /// Target voxel spacing in mm along R, A, S.
    pub pixdim: [f64; 3],
    /// Hounsfield value mapped to 0.
    pub a_min: f32,
    /// Hounsfield value mapped to 1.
    pub a_max: f32,
    /// Clip windowed intensities to `[0, 1]`.
    pub clip: bool,
    /// Crop image and label to the box where the windowed image exceeds
    /// `foreground_threshold` (MONAI's validation transform).
    pub crop_foreground: bool,
    /// Threshold on the windowed image for `crop_foreground` (MONAI: `x > 0`).
    pub foreground_threshold: f32,
    /// Voxels kept around the foreground box.
    pub crop_margin: usize,
    /// Resize to this shape after windowing/cropping (the authors' training transform used
    /// `[256, 256, 128]`); `None` keeps the resampled shape.
    pub resize: Option<[usize; 3]>,
    /// Pad every side up to a multiple of this (16 for a U-Net with four stride-2 levels);
    /// 1 disables padding.
    pub pad_multiple: usize,
}

impl Default for PreprocessConfig {
    /// The generic abdominal recipe: 1.5×1.5×2 mm, window −200..200 HU, clipped.
    fn default() -> Self {
        PreprocessConfig {
            pixdim: [1.5, 1.5, 2.0],
            a_min: -200.0,
            a_max: 200.0,
            clip: true,
            crop_foreground: false,
            foreground_threshold: 0.0,
            crop_margin: 0,
            resize: None,
            pad_multiple: 16,
        }
    }
}

impl PreprocessConfig {
    /// Spleen (MSD Task09): window −57..164 HU.
    pub fn spleen() -> Self {
        Self::default().with_window(-57.0, 164.0)
    }

    /// Liver (MSD Task03): window −200..200 HU.
    pub fn liver() -> Self {
        Self::default().with_window(-200.0, 200.0)
    }

    /// Pancreas (MSD Task07): window −87..199 HU.
    pub fn pancreas() -> Self {
        Self::default().with_window(-87.0, 199.0)
    }

    /// Kidney (KiTS19): window −79..304 HU.
    pub fn kidney() -> Self {
        Self::default().with_window(-79.0, 304.0)
    }

    /// The preset for an organ or dataset name (`"spleen"`, `"liver"`, `"pancreas"`,
    /// `"kidney"`/`"kits19"`, `"generic"`), case-insensitive.
    ///
    /// # Errors
    /// [`DataError::Config`] for an unknown name.
    pub fn preset(name: &str) -> Result<Self> {
        match name.to_ascii_lowercase().as_str() {
            "spleen" | "task09" | "task09_spleen" => Ok(Self::spleen()),
            "liver" | "task03" | "task03_liver" => Ok(Self::liver()),
            "pancreas" | "task07" | "task07_pancreas" => Ok(Self::pancreas()),
            "kidney" | "kidneys" | "kits19" | "kits" => Ok(Self::kidney()),
            "generic" | "default" | "btcv" => Ok(Self::default()),
            other => Err(DataError::Config(format!(
                "no preprocessing preset named {other:?} \
                 (known: spleen, liver, pancreas, kidney, generic)"
            ))),
        }
    }

    /// The same recipe with another HU window.
    pub fn with_window(mut self, a_min: f32, a_max: f32) -> Self {
        self.a_min = a_min;
        self.a_max = a_max;
        self
    }

    /// Checks every field.
    ///
    /// # Errors
    /// [`DataError::Config`] naming the first bad field.
    pub fn validate(&self) -> Result<()> {
        if self.pixdim.iter().any(|p| !p.is_finite() || *p <= 0.0) {
            return Err(DataError::Config(format!(
                "pixdim must be three positive numbers, got {:?}",
                self.pixdim
            )));
        }
        if !(self.a_min.is_finite() && self.a_max.is_finite() && self.a_min < self.a_max) {
            return Err(DataError::Config(format!(
                "a_min must be below a_max, got a_min = {}, a_max = {}",
                self.a_min, self.a_max
            )));
        }
        if !self.foreground_threshold.is_finite() {
            return Err(DataError::Config(
                "foreground_threshold must be finite".into(),
            ));
        }
        if let Some(shape) = self.resize {
            if shape.contains(&0) {
                return Err(DataError::Config(format!(
                    "resize must have no zero side, got {shape:?}"
                )));
            }
        }
        if self.pad_multiple == 0 {
            return Err(DataError::Config(
                "pad_multiple must be at least 1 (1 disables padding)".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_carry_the_paper_windows_and_validate() {
        for (name, window) in [
            ("spleen", (-57.0, 164.0)),
            ("liver", (-200.0, 200.0)),
            ("pancreas", (-87.0, 199.0)),
            ("KiTS19", (-79.0, 304.0)),
        ] {
            let c = PreprocessConfig::preset(name).expect("preset");
            assert_eq!((c.a_min, c.a_max), window);
            c.validate().expect("valid");
        }
        assert!(PreprocessConfig::preset("brain").is_err());
    }

    #[test]
    fn validate_rejects_bad_fields() {
        let bad = [
            PreprocessConfig {
                pixdim: [1.5, 0.0, 2.0],
                ..Default::default()
            },
            PreprocessConfig::default().with_window(100.0, -100.0),
            PreprocessConfig {
                pad_multiple: 0,
                ..Default::default()
            },
            PreprocessConfig {
                resize: Some([256, 0, 128]),
                ..Default::default()
            },
        ];
        for c in bad {
            assert!(matches!(c.validate(), Err(DataError::Config(_))), "{c:?}");
        }
    }

    #[test]
    fn serde_round_trip_and_defaults_for_missing_fields() {
        let c = PreprocessConfig::spleen();
        let json = serde_json::to_string(&c).expect("serialise");
        let back: PreprocessConfig = serde_json::from_str(&json).expect("deserialise");
        assert_eq!(back, c);
        let partial: PreprocessConfig =
            serde_json::from_str(r#"{"a_min": -10, "a_max": 10}"#).expect("partial");
        assert_eq!(partial.pixdim, [1.5, 1.5, 2.0]);
        assert!(serde_json::from_str::<PreprocessConfig>(r#"{"pixdimm": [1,1,1]}"#).is_err());
    }
}
