//! Host batches (from [`segviz_data::batches`]) as Burn tensors.

use burn::tensor::{Device, Int, Tensor, TensorData};
use segviz_data::HostBatch;

/// Tensors of a [`HostBatch`].
pub trait BatchTensors {
    /// The images as a tensor `[n, 1, d, h, w]`.
    fn image_tensor(&self, device: &Device) -> Tensor<5>;

    /// A label tensor `[n, d, h, w]` after mapping every vocabulary value through `map`.
    fn target_tensor(&self, device: &Device, map: impl Fn(u8) -> i64) -> Tensor<4, Int>;
}

impl BatchTensors for HostBatch {
    fn image_tensor(&self, device: &Device) -> Tensor<5> {
        let [d, h, w] = self.shape;
        Tensor::from_data(
            TensorData::new(self.images.clone(), [self.len(), 1, d, h, w]),
            device,
        )
    }

    fn target_tensor(&self, device: &Device, map: impl Fn(u8) -> i64) -> Tensor<4, Int> {
        let [d, h, w] = self.shape;
        let values: Vec<i64> = self.labels.iter().map(|&v| map(v)).collect();
        Tensor::from_data(TensorData::new(values, [self.len(), d, h, w]), device)
    }
}
