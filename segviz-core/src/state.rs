//! Model state as plain data: every tensor of a SegViz model by its stable path, with the
//! classification that federation, checkpoints and the Flower node all rely on.
//!
//! This module is the one place that decides which tensor is shared representation, which is
//! BatchNorm, and which belongs to which task head. It decides from the module *structure*
//! (a tensor owned by a Burn `BatchNorm` module is BatchNorm; a tensor under the `heads`
//! vector belongs to the head at that index), never from a substring of a name.
//!
//! # Paths
//! A path is the chain of Burn field names from the model root, with the head index
//! replaced by the task name, for example
//! - `representation.down.0.units.1.conv.weight` (encoder level 0, second conv),
//! - `representation.bottom.residual.bias`,
//! - `representation.up.2.upsample_adn.norm.running_var`,
//! - `heads.liver.block.refine.units.0.conv.weight`.
//!
//! [`crate::monai::monai_key`] maps each path to its MONAI `state_dict` key.

use std::collections::BTreeMap;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::error::{CoreError, Result};

/// Which part of the SegViz model a tensor belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TensorRole {
    /// The shared representation block.
    Representation,
    /// The head of the named task.
    Head(String),
}

/// One tensor of a model state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StateTensor {
    /// Shape, outermost first.
    pub shape: Vec<usize>,
    /// Values in C order.
    pub data: Vec<f32>,
    /// Representation or which head.
    pub role: TensorRole,
    /// Owned by a BatchNorm layer (weight, bias or running statistics).
    pub batch_norm: bool,
    /// Learned by the optimiser (false for BatchNorm running statistics).
    pub trainable: bool,
}

impl StateTensor {
    /// Number of values.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Whether the tensor has no value.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

/// The state of a SegViz model (or of a subset of it), tensor by path, sorted by path.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelState {
    /// Tensors by path.
    pub tensors: BTreeMap<String, StateTensor>,
}

impl ModelState {
    /// Keeps the tensors for which `keep` is true.
    pub fn filter(&self, mut keep: impl FnMut(&str, &StateTensor) -> bool) -> ModelState {
        ModelState {
            tensors: self
                .tensors
                .iter()
                .filter(|(p, t)| keep(p, t))
                .map(|(p, t)| (p.clone(), t.clone()))
                .collect(),
        }
    }

    /// The representation block's tensors.
    pub fn representation(&self) -> ModelState {
        self.filter(|_, t| t.role == TensorRole::Representation)
    }

    /// The tensors of one task head.
    pub fn head(&self, task: &str) -> ModelState {
        self.filter(|_, t| matches!(&t.role, TensorRole::Head(h) if h == task))
    }

    /// Task names that have at least one tensor here, sorted.
    pub fn tasks(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .tensors
            .values()
            .filter_map(|t| match &t.role {
                TensorRole::Head(h) => Some(h.clone()),
                TensorRole::Representation => None,
            })
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// Adds or replaces every tensor of `other`.
    pub fn merge(&mut self, other: ModelState) {
        self.tensors.extend(other.tensors);
    }

    /// Number of values of the trainable tensors.
    pub fn num_trainable(&self) -> usize {
        self.tensors
            .values()
            .filter(|t| t.trainable)
            .map(StateTensor::len)
            .sum()
    }

    /// Total number of values.
    pub fn num_values(&self) -> usize {
        self.tensors.values().map(StateTensor::len).sum()
    }
}

/// Tracks the path and the enclosing module types while Burn walks a module tree.
#[derive(Default)]
struct PathTracker {
    /// Path segments (field names, vector indices, with head indices renamed).
    path: Vec<String>,
    /// Container types, innermost last (e.g. `"Struct:BatchNorm"`).
    containers: Vec<String>,
    /// Task names, in head order.
    tasks: Vec<String>,
}

impl PathTracker {
    fn new(tasks: Vec<String>) -> Self {
        PathTracker {
            tasks,
            ..Default::default()
        }
    }

    fn enter(&mut self, name: &str, container: &str) {
        // The element of the `heads` vector is named by its task, so paths survive adding
        // or removing another head.
        let segment = match (self.path.as_slice(), container) {
            ([only], "Vec") if only == "heads" => name
                .parse::<usize>()
                .ok()
                .and_then(|i| self.tasks.get(i).cloned())
                .unwrap_or_else(|| name.to_string()),
            _ => name.to_string(),
        };
        self.path.push(segment);
        self.containers.push(container.to_string());
    }

    fn exit(&mut self) {
        self.path.pop();
        self.containers.pop();
    }

    fn current(&self) -> String {
        self.path.join(".")
    }

    /// The role, BatchNorm flag and trainability of the tensor at the current position.
    fn classify(&self) -> (TensorRole, bool, bool) {
        let role = match self.path.as_slice() {
            [first, task, ..] if first == "heads" => TensorRole::Head(task.clone()),
            _ => TensorRole::Representation,
        };
        // Burn enters every field with the type of the struct that declares it, so the
        // innermost container is the module that owns this tensor.
        let batch_norm = self
            .containers
            .last()
            .is_some_and(|c| c == "Struct:BatchNorm");
        let field = self.path.last().map(String::as_str).unwrap_or("");
        let running_statistic = batch_norm && field.starts_with("running_");
        (role, batch_norm, !running_statistic)
    }
}

/// Collects every float tensor of a module with its path.
struct Collector {
    tracker: PathTracker,
    state: ModelState,
    /// Only shapes are wanted (no copy of the values).
    shapes_only: bool,
}

impl ModuleVisitor for Collector {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.tracker.enter(name, container_type);
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.tracker.exit();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        // A layout must not materialise lazily initialised parameters.
        let (shape, data) = if self.shapes_only {
            (param.lazy_shape().to_vec(), Vec::new())
        } else {
            let tensor = param.val();
            let shape = tensor.dims().to_vec();
            // The model's own tensors are f32; a failed conversion is a Burn invariant broken.
            let data = tensor
                .into_data()
                .convert::<f32>()
                .try_to_vec::<f32>()
                .unwrap_or_default();
            (shape, data)
        };
        let (role, batch_norm, trainable) = self.tracker.classify();
        self.state.tensors.insert(
            self.tracker.current(),
            StateTensor {
                shape,
                data,
                role,
                batch_norm,
                trainable,
            },
        );
    }
}

/// Reads every float tensor of `module` (values copied to the host).
///
/// `tasks` names the elements of a `heads` vector, in order (empty for a module without heads).
pub fn extract_state<M: Module>(module: &M, tasks: &[String]) -> ModelState {
    let mut collector = Collector {
        tracker: PathTracker::new(tasks.to_vec()),
        state: ModelState::default(),
        shapes_only: false,
    };
    module.visit(&mut collector);
    collector.state
}

/// Paths, shapes and classification of every tensor, without copying values.
pub fn describe_state<M: Module>(module: &M, tasks: &[String]) -> ModelState {
    let mut collector = Collector {
        tracker: PathTracker::new(tasks.to_vec()),
        state: ModelState::default(),
        shapes_only: true,
    };
    module.visit(&mut collector);
    collector.state
}

/// Gives every parameter an identifier derived from its path (64-bit FNV-1a of the path).
struct PathIds {
    tracker: PathTracker,
}

impl ModuleMapper for PathIds {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.tracker.enter(name, container_type);
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.tracker.exit();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let id = burn::module::ParamId::from(path_hash(&self.tracker.current()));
        if param.id == id {
            return param;
        }
        let value = param.val();
        param.transform_for_load(value, id)
    }
}

/// 64-bit FNV-1a of a parameter path.
fn path_hash(path: &str) -> u64 {
    path.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Gives every parameter of `module` an identifier that depends only on its path, so that
/// state keyed by parameter identifiers (an optimiser's moments) survives rebuilding the
/// model, in this process or another one. Values and gradient settings are kept.
pub fn with_path_ids<M: Module>(module: M, tasks: &[String]) -> M {
    module.map(&mut PathIds {
        tracker: PathTracker::new(tasks.to_vec()),
    })
}

/// Overwrites the tensors of a module that `state` names.
struct Loader<'a> {
    tracker: PathTracker,
    state: &'a ModelState,
    applied: usize,
}

impl ModuleMapper for Loader<'_> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.tracker.enter(name, container_type);
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.tracker.exit();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let Some(entry) = self.state.tensors.get(&self.tracker.current()) else {
            return param;
        };
        let device = param.lazy_device();
        let data = TensorData::new(entry.data.clone(), entry.shape.clone());
        let tensor = Tensor::<D>::from_data(data, &device);
        self.applied += 1;
        let id = param.id;
        param.transform_for_load(tensor, id)
    }
}

/// Writes the tensors that `state` names into `module` and leaves the others alone.
///
/// Every tensor of `state` must exist in the module with the same shape and carry as many
/// values as its shape says; otherwise nothing is changed and the error says which tensor.
/// Gradient settings of the module's parameters are kept.
pub fn apply_state<M: Module>(module: M, tasks: &[String], state: &ModelState) -> Result<M> {
    let layout = describe_state(&module, tasks);
    for (path, entry) in &state.tensors {
        let Some(own) = layout.tensors.get(path) else {
            return Err(CoreError::State(format!(
                "the model has no tensor {path:?}"
            )));
        };
        if own.shape != entry.shape {
            return Err(CoreError::State(format!(
                "{path}: the model's shape is {:?}, the state's {:?}",
                own.shape, entry.shape
            )));
        }
        let expected: usize = entry.shape.iter().product();
        if entry.data.len() != expected {
            return Err(CoreError::State(format!(
                "{path}: shape {:?} needs {expected} values, the state has {}",
                entry.shape,
                entry.data.len()
            )));
        }
        if entry.data.iter().any(|v| !v.is_finite()) {
            return Err(CoreError::State(format!(
                "{path}: the state holds NaN or infinite values"
            )));
        }
    }
    let mut loader = Loader {
        tracker: PathTracker::new(tasks.to_vec()),
        state,
        applied: 0,
    };
    let module = module.map(&mut loader);
    debug_assert_eq!(loader.applied, state.tensors.len());
    Ok(module)
}
