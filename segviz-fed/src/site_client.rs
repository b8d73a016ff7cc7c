//! A site as a federation client: its data, its local model (representation + the heads
//! of its own organs) and local training — the in-process counterpart of a Flower node.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use burn::module::Module;
use burn::tensor::Device;
use segviz_core::sliding_window::SlidingWindowConfig;
use segviz_core::{ModelState, SegVizModel};
use segviz_data::Organ;

use crate::client::FederatedClient;
use crate::error::{FedError, Result};
use crate::evaluate::{evaluate_site, mean_dice, Segmenter};
use crate::local::{train_epochs, LocalTrainingConfig, Objective, ProximalAnchor, Schedule};
use crate::messages::{ClientUpdate, EvaluateResult, FitInstructions};
use crate::strategy::ClientInfo;
use segviz_data::SiteData;

/// A site client. See the module documentation.
pub struct SiteClient {
    site: Arc<SiteData>,
    tasks: Vec<String>,
    model: SegVizModel,
    training: LocalTrainingConfig,
    window: SlidingWindowConfig,
    seed: u64,
}

impl SiteClient {
    /// A client for `site` whose local model is `global` restricted to the site's organs;
    /// the model must live on an autodiff device.
    pub fn new(
        site: Arc<SiteData>,
        global: &SegVizModel,
        training: LocalTrainingConfig,
        window: SlidingWindowConfig,
        seed: u64,
    ) -> Result<SiteClient> {
        let tasks: Vec<String> = site
            .annotated()
            .iter()
            .map(|o| o.name().to_string())
            .collect();
        if tasks.is_empty() {
            return Err(FedError::client(site.name(), "the site annotates no organ"));
        }
        let model = global.subset(&tasks)?;
        Ok(SiteClient {
            site,
            tasks,
            model,
            training,
            window,
            seed,
        })
    }

    /// The client's current local model.
    pub fn model(&self) -> &SegVizModel {
        &self.model
    }

    /// The site's data.
    pub fn site(&self) -> &Arc<SiteData> {
        &self.site
    }

    /// Fine-tunes the heads with the representation block frozen (weights and BatchNorm
    /// statistics) for `epochs` epochs, as after federation (paper §4.3).
    pub fn fine_tune(&mut self, epochs: usize, seed: u64) -> Result<()> {
        let frozen = self.model.clone().freeze_representation();
        let (model, _) = train_epochs(
            frozen,
            std::slice::from_ref(&self.site),
            Objective::TaskHeads,
            &self.training,
            epochs,
            Schedule {
                first_epoch: 0,
                total_epochs: epochs,
            },
            seed,
            None,
            None,
            |_| {},
        )?;
        self.model = model.unfreeze_representation();
        Ok(())
    }

    fn device(&self) -> Device {
        crate::local::model_device(&self.model)
    }
}

impl FederatedClient for SiteClient {
    fn info(&self) -> ClientInfo {
        ClientInfo {
            name: self.site.name().to_string(),
            tasks: self.tasks.clone(),
        }
    }

    fn fit(
        &mut self,
        instructions: &FitInstructions,
        deadline: Option<Instant>,
    ) -> Result<ClientUpdate> {
        let name = self.site.name().to_string();
        let model = self.model.clone().load_state(&instructions.state)?;
        let mu = instructions
            .config
            .get("proximal_mu")
            .copied()
            .unwrap_or(0.0);
        let anchor =
            (mu > 0.0).then(|| ProximalAnchor::new(&instructions.state, mu, &self.device()));
        let epochs = instructions.local_epochs;
        let seed = self.seed
            ^ segviz_core_hash(&name).wrapping_add(instructions.round as u64 * 0x1000_0001);
        let (model, stats) = train_epochs(
            model,
            std::slice::from_ref(&self.site),
            Objective::TaskHeads,
            &self.training,
            epochs,
            Schedule {
                first_epoch: (instructions.round - 1) * epochs,
                total_epochs: instructions.total_rounds * epochs,
            },
            seed,
            anchor.as_ref(),
            deadline,
            |_| {},
        )
        .map_err(|e| FedError::client(&name, e.to_string()))?;
        self.model = model;
        Ok(ClientUpdate {
            client: name,
            tasks: self.tasks.clone(),
            num_examples: stats.examples,
            state: self.model.state(),
            metrics: BTreeMap::from([
                ("loss".to_string(), stats.mean_loss),
                ("steps".to_string(), stats.steps as f64),
            ]),
        })
    }

    fn evaluate(&mut self, _round: usize, state: &ModelState) -> Result<EvaluateResult> {
        let model = self.model.clone().load_state(state)?;
        self.model = model;
        let eval_model = self.model.valid();
        let organs: Vec<Organ> = self
            .tasks
            .iter()
            .filter_map(|t| Organ::from_name(t))
            .collect();
        let device = crate::local::model_device(&eval_model);
        let scores = evaluate_site(
            &Segmenter::Single(Box::new(eval_model)),
            &self.site,
            &self.site.split.validation,
            &organs,
            &self.window,
            &device,
            |_, _, _, _| {},
        )?;
        Ok(EvaluateResult {
            client: self.site.name().to_string(),
            num_examples: scores.len(),
            metrics: mean_dice(&scores)
                .into_iter()
                .map(|(organ, d)| (format!("dice/{organ}"), d))
                .collect(),
        })
    }

    fn local_state(&self) -> ModelState {
        self.model.state()
    }

    fn restore_local_state(&mut self, state: &ModelState) -> Result<()> {
        self.model = self.model.clone().load_state(state)?;
        Ok(())
    }
}

/// A stable hash of a client name for seeding.
fn segviz_core_hash(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}
