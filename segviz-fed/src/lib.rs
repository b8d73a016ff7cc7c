//! # segviz-fed
//!
//! SegViz federation (paper §3–4): aggregation strategies ([`strategy`]: FedAvg, FedBN,
//! FedProx, each with the SegViz task-head rule), the client interface the server sees
//! ([`client`]), the server's round loop with faults and checkpoints ([`server`]), and the
//! statistics used to compare methods ([`stats`]).
//!
//! Only model state, counts and metrics cross between server and clients ([`messages`]).

pub mod batches;
pub mod client;
pub mod data_check;
pub mod error;
pub mod evaluate;
pub mod experiment;
pub mod local;
pub mod messages;
pub mod partial_labels;
pub mod server;
pub mod site_client;
pub mod stats;
pub mod strategy;

pub use client::FederatedClient;
pub use data_check::{check_cases, DataCheckProgress};
pub use error::{FedError, Result};
pub use messages::{ClientUpdate, EvaluateResult, FitInstructions};
pub use segviz_data::SiteData;
pub use server::{RoundReport, Server, ServerConfig, ServerEvent};
pub use site_client::{FineTuning, SiteClient};
pub use strategy::{AggregationStrategy, ClientInfo, FedAvg, FedBn, FedProx, Weighting};
