//! The SegViz model: one [`RepresentationBlock`] and any number of named [`TaskHead`]s
//! (paper §3.1, Fig. 2).
//!
//! The global model holds the heads of every task; a client's model holds only the heads of
//! the organs it annotated. Heads can be added or removed without touching the
//! representation block, so a site with a new organ can join a running federation.

use burn::config::Config;
use burn::module::Module;
use burn::tensor::activation::{sigmoid, softmax};
use burn::tensor::{Device, Tensor};

use crate::error::{CoreError, Result};
use crate::head::{TaskHead, TaskHeadConfig};
use crate::init::lecun_normal;
use crate::representation::{RepresentationBlock, RepresentationConfig};
use crate::state::{apply_state, describe_state, extract_state, ModelState, TensorRole};

/// The largest model [`SegVizConfig::validate`] accepts, in values (8 GiB of float32; the
/// paper's U-Net has 4.8 million).
pub const MAX_MODEL_VALUES: usize = 1 << 31;

/// Configuration of a [`SegVizModel`].
#[derive(Config, Debug, PartialEq)]
pub struct SegVizConfig {
    /// The U-Net body.
    pub representation: RepresentationConfig,
    /// Task (head) names in their fixed order, e.g. `["liver", "spleen", "pancreas",
    /// "kidney"]`. The order is the label order of [`crate::fusion`].
    pub tasks: Vec<String>,
    /// Classes per head: 2 (background / organ) for SegViz heads. A pooled multi-class model
    /// uses one head with `n + 1` classes.
    #[config(default = 2)]
    pub head_out_channels: usize,
}

impl SegVizConfig {
    /// The paper's U-Net (channels 16–256, strides 2, two residual units) with the given
    /// task heads.
    pub fn paper(tasks: &[&str]) -> Self {
        SegVizConfig::new(
            RepresentationConfig::new(),
            tasks.iter().map(|t| t.to_string()).collect(),
        )
    }

    /// Checks the configuration.
    pub fn validate(&self) -> Result<()> {
        self.representation.validate()?;
        for (i, task) in self.tasks.iter().enumerate() {
            validate_task_name(task)?;
            if self.tasks[..i].contains(task) {
                return Err(CoreError::Task {
                    name: task.clone(),
                    reason: "appears twice in the task list".into(),
                });
            }
        }
        if self.head_out_channels < 2 {
            return Err(CoreError::config(format!(
                "head_out_channels must be at least 2, got {}",
                self.head_out_channels
            )));
        }
        // Before anything is allocated: a model beyond reason (a corrupted or hostile
        // configuration declaring millions of channels) is refused, not an aborted process.
        match self.value_count() {
            Some(n) if n <= MAX_MODEL_VALUES => Ok(()),
            n => Err(CoreError::config(format!(
                "the configuration declares a model of {} values (channels {:?}, {} head(s) of \
                 {} classes), above the limit of {MAX_MODEL_VALUES} ({} GiB of float32)",
                n.map_or_else(|| "more than usize::MAX".to_string(), |n| n.to_string()),
                self.representation.channels,
                self.tasks.len(),
                self.head_out_channels,
                MAX_MODEL_VALUES >> 28
            ))),
        }
    }

    /// Number of values (parameters and BatchNorm statistics, as in [`ModelState`]) a model
    /// of this configuration holds, counted without building it; `None` if the count
    /// overflows. Assumes `representation` is valid.
    pub fn value_count(&self) -> Option<usize> {
        let head = crate::blocks::count::up_block(
            self.representation.out_channels(),
            self.head_out_channels,
            true,
        )?;
        self.representation
            .value_count()?
            .checked_add(head.checked_mul(self.tasks.len())?)
    }

    fn head_config(&self) -> TaskHeadConfig {
        TaskHeadConfig::new(self.representation.out_channels())
            .with_out_channels(self.head_out_channels)
            .with_stride(self.representation.strides[0])
    }

    /// Builds the model with the paper's LeCun-normal initialisation, deterministic for a
    /// given `seed` (each tensor's values depend only on the seed and its path).
    pub fn init(&self, device: &Device, seed: u64) -> Result<SegVizModel> {
        lecun_normal(self.build(device)?, seed)
    }

    /// The module structure with Burn's lazy default initialisation, meant to be filled by
    /// [`SegVizModel::load_state`] (which never materialises the lazy values).
    fn build(&self, device: &Device) -> Result<SegVizModel> {
        self.validate()?;
        Ok(SegVizModel {
            representation: self.representation.init(device)?,
            heads: self
                .tasks
                .iter()
                .map(|_| self.head_config().init(device))
                .collect(),
            config: self.clone(),
        })
    }

    /// A model of this configuration holding `state` (every tensor), on `device`.
    pub fn with_state(&self, device: &Device, state: &ModelState) -> Result<SegVizModel> {
        let model = self.build(device)?;
        let layout = model.layout();
        if let Some(missing) = layout
            .tensors
            .keys()
            .find(|p| !state.tensors.contains_key(*p))
        {
            return Err(CoreError::State(format!(
                "the state has no tensor {missing:?}"
            )));
        }
        model.load_state(state)
    }
}

/// A task name must be usable as a path segment and a file name.
fn validate_task_name(task: &str) -> Result<()> {
    let ok = !task.is_empty()
        && task
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if ok {
        Ok(())
    } else {
        Err(CoreError::Task {
            name: task.to_string(),
            reason: "task names use only ASCII letters, digits, '_' and '-'".into(),
        })
    }
}

/// A SegViz model. See the module documentation.
#[derive(Module, Debug)]
pub struct SegVizModel {
    /// The shared U-Net body.
    pub representation: RepresentationBlock,
    /// One head per task, in the order of `config.tasks`.
    pub heads: Vec<TaskHead>,
    /// The configuration the model was built from (kept in step with `heads`).
    #[module(skip)]
    pub config: SegVizConfig,
}

impl SegVizModel {
    /// Task names in head order.
    pub fn tasks(&self) -> &[String] {
        &self.config.tasks
    }

    /// The configuration (tasks included).
    pub fn config(&self) -> &SegVizConfig {
        &self.config
    }

    /// Index of a task's head.
    pub fn task_index(&self, task: &str) -> Result<usize> {
        self.config
            .tasks
            .iter()
            .position(|t| t == task)
            .ok_or_else(|| CoreError::Task {
                name: task.to_string(),
                reason: format!("the model has heads {:?}", self.config.tasks),
            })
    }

    /// Checks that an input of shape `[batch, channels, d, h, w]` can go through the model.
    pub fn check_input(&self, dims: [usize; 5]) -> Result<()> {
        if dims[1] != self.config.representation.in_channels {
            return Err(CoreError::Shape {
                shape: dims.to_vec(),
                reason: format!(
                    "the model takes {} input channel(s)",
                    self.config.representation.in_channels
                ),
            });
        }
        self.config
            .representation
            .check_input([dims[2], dims[3], dims[4]])
    }

    /// Representation features.
    ///
    /// # Shapes
    /// - input: `[batch, in_channels, d, h, w]`
    /// - output: `[batch, 2·channels[0], d/s₀, h/s₀, w/s₀]`
    pub fn features(&self, x: Tensor<5>) -> Tensor<5> {
        self.representation.forward(x)
    }

    /// Logits of every head, in task order.
    ///
    /// # Shapes
    /// - input: `[batch, in_channels, d, h, w]`, sizes multiples of the strides' product
    /// - output: one `[batch, head_out_channels, d, h, w]` tensor per task
    ///
    /// # Panics
    /// On an input the network cannot take (see [`SegVizModel::check_input`]).
    pub fn forward(&self, x: Tensor<5>) -> Vec<Tensor<5>> {
        let features = self.features(x);
        self.heads
            .iter()
            .map(|h| h.forward(features.clone()))
            .collect()
    }

    /// Logits of one head.
    ///
    /// # Shapes
    /// Same as [`SegVizModel::forward`], one tensor.
    pub fn forward_task(&self, x: Tensor<5>, task: &str) -> Result<Tensor<5>> {
        let i = self.task_index(task)?;
        Ok(self.heads[i].forward(self.features(x)))
    }

    /// Probabilities ready for [`crate::fusion`]: with two-class heads, the organ
    /// probability (softmax channel 1) of each head stacked in task order; with a single
    /// multi-class head, its softmax over classes.
    ///
    /// # Shapes
    /// - input: `[batch, in_channels, d, h, w]`
    /// - output: `[batch, n_tasks, d, h, w]` (two-class heads) or `[batch, classes, d, h, w]`
    pub fn probabilities(&self, x: Tensor<5>) -> Tensor<5> {
        let logits = self.forward(x);
        if self.config.head_out_channels > 2 {
            let mut it = logits.into_iter();
            // A multi-class model has exactly one head (validated at construction).
            return match it.next() {
                Some(l) => softmax(l, 1),
                None => unreachable_no_heads(),
            };
        }
        let organs: Vec<Tensor<5>> = logits.into_iter().map(two_class_probability).collect();
        Tensor::cat(organs, 1)
    }

    /// The organ probability (softmax channel 1) of the two-class head at `index` alone.
    ///
    /// # Shapes
    /// - input: `[batch, in_channels, d, h, w]`
    /// - output: `[batch, 1, d, h, w]`
    ///
    /// # Panics
    /// If `index` is not a head of the model (see [`SegVizModel::task_index`]).
    pub fn task_probability(&self, x: Tensor<5>, index: usize) -> Tensor<5> {
        two_class_probability(self.heads[index].forward(self.features(x)))
    }

    /// Adds a freshly initialised head for a new task, leaving every other tensor alone.
    pub fn add_task(mut self, task: &str, seed: u64) -> Result<Self> {
        validate_task_name(task)?;
        if self.config.tasks.iter().any(|t| t == task) {
            return Err(CoreError::Task {
                name: task.to_string(),
                reason: "the model already has this head".into(),
            });
        }
        let device = self.device();
        // Initialise the new head inside a one-head model so its path (and so its LeCun
        // values) is the same as if it had been there from the start.
        let mut single = self.config.clone();
        single.tasks = vec![task.to_string()];
        let head_only = SegVizModel {
            representation: self.representation.clone(),
            heads: vec![self.config.head_config().init(&device)],
            config: single,
        };
        let head_only = lecun_normal(head_only, seed)?;
        self.heads.push(
            head_only
                .heads
                .into_iter()
                .next()
                .ok_or_else(|| CoreError::State("could not build the new head".into()))?,
        );
        self.config.tasks.push(task.to_string());
        Ok(self)
    }

    /// Removes a task's head; the representation block is untouched.
    pub fn remove_task(mut self, task: &str) -> Result<Self> {
        let i = self.task_index(task)?;
        self.heads.remove(i);
        self.config.tasks.remove(i);
        Ok(self)
    }

    /// An independent copy holding only the representation block and the heads of `tasks`
    /// (in the given order): the model a client trains. See [`SegVizModel::deep_copy`].
    pub fn subset(&self, tasks: &[String]) -> Result<Self> {
        for t in tasks {
            self.task_index(t)?;
        }
        let mut config = self.config.clone();
        config.tasks = tasks.to_vec();
        let state = self.state();
        let wanted = state.filter(|_, t| match &t.role {
            TensorRole::Representation => true,
            TensorRole::Head(h) => tasks.contains(h),
        });
        config.with_state(&self.device(), &wanted)
    }

    /// An independent copy: its own parameters *and its own BatchNorm running statistics*.
    ///
    /// Burn's `clone()` shares each BatchNorm's running statistics between the copies (they
    /// are meant for data-parallel training on one model), so two sites training clones of
    /// one model would update the same statistics. Every model that trains on its own —
    /// a client, a baseline — must be a deep copy.
    pub fn deep_copy(&self) -> Result<Self> {
        self.config.with_state(&self.device(), &self.state())
    }

    /// The device of the model's parameters.
    pub fn device(&self) -> Device {
        self.representation.bottom.units[0]
            .conv
            .weight
            .lazy_device()
    }

    /// Every tensor with its path and role (values copied to the host).
    pub fn state(&self) -> ModelState {
        self.sync_running_statistics();
        extract_state(self, &self.config.tasks)
    }

    /// Burn keeps each BatchNorm's newest running statistics as a pending per-thread update
    /// until they are synchronised; reading the state before that would return values one
    /// step old, and writing it would be overwritten by the pending update. `valid()`
    /// synchronises them (in place, for this model too).
    fn sync_running_statistics(&self) {
        let _ = self.valid();
    }

    /// Paths, shapes and roles of every tensor (no values).
    pub fn layout(&self) -> ModelState {
        describe_state(self, &self.config.tasks)
    }

    /// Writes the tensors that `state` names (all or a subset); see
    /// [`crate::state::apply_state`].
    ///
    /// BatchNorm running statistics are written in place, and Burn's `clone()` shares them
    /// with the original: load into a [`SegVizModel::deep_copy`] (or build with
    /// [`SegVizConfig::with_state`]) when the original must stay as it is.
    pub fn load_state(self, state: &ModelState) -> Result<Self> {
        self.sync_running_statistics();
        let tasks = self.config.tasks.clone();
        apply_state(self, &tasks, state)
    }

    /// The same model with parameter identifiers derived from their paths (see
    /// [`crate::state::with_path_ids`]): what an optimiser whose state must outlive the
    /// model object (across rounds, or saved and restored) is stepped with.
    pub fn with_path_ids(self) -> Self {
        let tasks = self.config.tasks.clone();
        crate::state::with_path_ids(self, &tasks)
    }

    /// Number of trainable parameters (BatchNorm running statistics excluded), comparable
    /// with PyTorch's `sum(p.numel() for p in model.parameters())`.
    pub fn num_trainable_params(&self) -> usize {
        self.layout()
            .tensors
            .values()
            .filter(|t| t.trainable)
            .map(|t| t.shape.iter().product::<usize>())
            .sum()
    }

    /// Freezes the representation block for fine-tuning: its weights stop receiving
    /// gradients and its BatchNorm layers stop updating their running statistics.
    pub fn freeze_representation(mut self) -> Self {
        self.representation = self.representation.freeze();
        self
    }

    /// Undoes [`SegVizModel::freeze_representation`].
    pub fn unfreeze_representation(mut self) -> Self {
        self.representation = self.representation.unfreeze();
        self
    }
}

#[cold]
fn unreachable_no_heads() -> Tensor<5> {
    panic!("a SegViz model with a multi-class head must have exactly one head")
}

/// Channel 1 of the softmax of two-class logits `[batch, 2, d, h, w]`, as `[batch, 1, d, h, w]`.
///
/// With two classes, `softmax(l)₁ = σ(l₁ − l₀)`; computed that way it needs no softmax along
/// the channel axis, which on the CPU backend permutes the whole tensor to put the channels
/// last and back (a tenth of a whole-scan segmentation's time).
fn two_class_probability(logits: Tensor<5>) -> Tensor<5> {
    if let Some(p) = crate::fast_conv::organ_probability(&logits) {
        return p;
    }
    let [b, _, d, h, w] = logits.dims();
    let organ = logits.clone().slice([0..b, 1..2, 0..d, 0..h, 0..w]);
    let background = logits.slice([0..b, 0..1, 0..d, 0..h, 0..w]);
    sigmoid(organ - background)
}
