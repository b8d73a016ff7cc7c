//! The Fleet API as a node calls it: `POST /v1/fleet/<rpc>` with a protobuf body, signed
//! headers on every call, errors as JSON.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use prost::Message;

use crate::error::{FlowerError, Result};
use crate::protocol::auth::NodeIdentity;
use crate::protocol::proto;
use crate::protocol::FLWR_VERSION;

/// Largest response body accepted (objects are at most one 5 MiB chunk; messages are small).
const MAX_RESPONSE_BYTES: u64 = 256 * 1024 * 1024;

/// How the node reaches the SuperLink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// Plain HTTP (a SuperLink started with `--insecure`), for loopback and tests.
    Insecure,
    /// HTTPS, trusting the PEM certificates in the given file (the federation's root CA),
    /// or the built-in web roots when `None`.
    Tls {
        /// PEM file with the root certificate(s).
        root_ca: Option<std::path::PathBuf>,
    },
}

/// A signed Fleet API client. Cheap to clone (the heartbeat thread holds one).
#[derive(Clone)]
pub struct FleetClient {
    agent: ureq::Agent,
    base: Arc<str>,
    address: Arc<str>,
    identity: NodeIdentity,
}

impl FleetClient {
    /// A client for the SuperLink at `address` (`host:port`).
    pub fn new(address: &str, transport: &Transport, identity: NodeIdentity) -> Result<Self> {
        if address.contains("://") || !address.contains(':') {
            return Err(FlowerError::Config(format!(
                "--superlink {address:?}: expected HOST:PORT (no scheme)"
            )));
        }
        let mut config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(300)))
            .user_agent(format!(
                "segviz-flower/{} (flwr {FLWR_VERSION})",
                env!("CARGO_PKG_VERSION")
            ));
        let scheme = match transport {
            Transport::Insecure => "http",
            Transport::Tls { root_ca } => {
                if let Some(path) = root_ca {
                    config = config.tls_config(tls_trusting(path)?);
                }
                "https"
            }
        };
        Ok(FleetClient {
            agent: config.build().new_agent(),
            base: format!("{scheme}://{address}/v1/fleet").into(),
            address: address.into(),
            identity,
        })
    }

    /// The node's identity.
    pub fn identity(&self) -> &NodeIdentity {
        &self.identity
    }

    /// The SuperLink's `host:port`.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// One call: `rpc` is the kebab-case Fleet method (`pull-messages`, …).
    pub fn call<Req: Message, Resp: Message + Default>(
        &self,
        rpc: &str,
        request: &Req,
    ) -> Result<Resp> {
        self.call_with_headers(rpc, request, &self.identity.headers())
    }

    /// One call with the given authentication headers (tests use it to send bad ones).
    pub fn call_with_headers<Req: Message, Resp: Message + Default>(
        &self,
        rpc: &str,
        request: &Req,
        auth: &[(&'static str, String)],
    ) -> Result<Resp> {
        let mut builder = self
            .agent
            .post(format!("{}/{rpc}", self.base))
            .header("content-type", "application/protobuf")
            .header("accept", "application/protobuf")
            .header("flwr-package-name", "segviz-flower")
            .header("flwr-package-version", env!("CARGO_PKG_VERSION"));
        for (name, value) in auth {
            builder = builder.header(*name, value);
        }
        let mut response =
            builder
                .send(request.encode_to_vec())
                .map_err(|e| FlowerError::Unreachable {
                    address: self.address.to_string(),
                    rpc: rpc.to_string(),
                    reason: e.to_string(),
                })?;
        let status = response.status().as_u16();
        let body = response
            .body_mut()
            .with_config()
            .limit(MAX_RESPONSE_BYTES)
            .read_to_vec()
            .map_err(|e| FlowerError::Unreachable {
                address: self.address.to_string(),
                rpc: rpc.to_string(),
                reason: format!("reading the answer: {e}"),
            })?;
        match status {
            200 => Resp::decode(body.as_slice())
                .map_err(|e| FlowerError::protocol(format!("{rpc}: undecodable answer: {e}"))),
            401 | 403 => Err(FlowerError::Unauthorized {
                rpc: rpc.to_string(),
                message: error_text(&body),
            }),
            _ => Err(FlowerError::Rejected {
                rpc: rpc.to_string(),
                status,
                message: error_text(&body),
            }),
        }
    }

    /// Registers this node's public key; returns the node id the SuperLink gave it.
    pub fn register(&self) -> Result<u64> {
        let r: proto::RegisterNodeFleetResponse = self.call(
            "register-node",
            &proto::RegisterNodeFleetRequest {
                public_key: self.identity.public_key_pem().to_vec(),
            },
        )?;
        Ok(r.node_id)
    }

    /// Marks the node online, promising a heartbeat every `heartbeat_interval` seconds.
    pub fn activate(&self, heartbeat_interval: f64) -> Result<u64> {
        let r: proto::ActivateNodeResponse = self.call(
            "activate-node",
            &proto::ActivateNodeRequest {
                public_key: self.identity.public_key_pem().to_vec(),
                heartbeat_interval,
            },
        )?;
        Ok(r.node_id)
    }

    /// One heartbeat; `false` if the SuperLink no longer knows the node.
    pub fn heartbeat(&self, node_id: u64, heartbeat_interval: f64) -> Result<bool> {
        let r: proto::SendNodeHeartbeatResponse = self.call(
            "send-node-heartbeat",
            &proto::SendNodeHeartbeatRequest {
                node: Some(proto::Node { node_id }),
                heartbeat_interval,
            },
        )?;
        Ok(r.success)
    }

    /// Messages waiting for this node, with their object trees.
    pub fn pull_messages(&self, node_id: u64) -> Result<proto::PullMessagesResponse> {
        self.call(
            "pull-messages",
            &proto::PullMessagesRequest {
                node: Some(proto::Node { node_id }),
                message_ids: vec![],
            },
        )
    }

    /// One object's bytes: `Ok(None)` while it is not available yet.
    pub fn pull_object(
        &self,
        node_id: u64,
        run_id: u64,
        object_id: &str,
    ) -> Result<Option<Vec<u8>>> {
        let r: proto::PullObjectResponse = self.call(
            "pull-object",
            &proto::PullObjectRequest {
                node: Some(proto::Node { node_id }),
                run_id,
                object_id: object_id.to_string(),
            },
        )?;
        if !r.object_found {
            return Err(FlowerError::protocol(format!(
                "the SuperLink does not have object {object_id} of run {run_id}"
            )));
        }
        Ok(r.object_available.then_some(r.object_content))
    }

    /// Tells the SuperLink the message and all its objects arrived.
    pub fn confirm_received(&self, node_id: u64, run_id: u64, message_id: &str) -> Result<()> {
        let _: proto::ConfirmMessageReceivedResponse = self.call(
            "confirm-message-received",
            &proto::ConfirmMessageReceivedRequest {
                node: Some(proto::Node { node_id }),
                run_id,
                message_object_id: message_id.to_string(),
            },
        )?;
        Ok(())
    }

    /// Pushes a reply (without content) and its object tree; returns the ids the SuperLink
    /// still wants and the push session id.
    pub fn push_message(
        &self,
        node_id: u64,
        message: proto::Message,
        tree: proto::ObjectTree,
        runtime_seconds: f64,
    ) -> Result<(Vec<String>, String)> {
        let r: proto::PushMessagesResponse = self.call(
            "push-messages",
            &proto::PushMessagesRequest {
                node: Some(proto::Node { node_id }),
                messages_list: vec![message],
                message_object_trees: vec![tree],
                clientapp_runtime_list: vec![runtime_seconds],
            },
        )?;
        Ok((r.objects_to_push, r.session_id))
    }

    /// Pushes one object of a reply.
    pub fn push_object(
        &self,
        node_id: u64,
        run_id: u64,
        session_id: &str,
        object_id: &str,
        content: Vec<u8>,
    ) -> Result<()> {
        let r: proto::PushObjectResponse = self.call(
            "push-object",
            &proto::PushObjectRequest {
                node: Some(proto::Node { node_id }),
                run_id,
                object_id: object_id.to_string(),
                object_content: content,
                session_id: session_id.to_string(),
            },
        )?;
        if !r.stored {
            return Err(FlowerError::protocol(format!(
                "the SuperLink did not store object {object_id}"
            )));
        }
        Ok(())
    }

    /// Marks the node offline.
    pub fn deactivate(&self, node_id: u64) -> Result<()> {
        let _: proto::DeactivateNodeResponse =
            self.call("deactivate-node", &proto::DeactivateNodeRequest { node_id })?;
        Ok(())
    }

    /// Removes the node from the SuperLink.
    pub fn unregister(&self, node_id: u64) -> Result<()> {
        let _: proto::UnregisterNodeFleetResponse = self.call(
            "unregister-node",
            &proto::UnregisterNodeFleetRequest { node_id },
        )?;
        Ok(())
    }
}

fn tls_trusting(path: &Path) -> Result<ureq::tls::TlsConfig> {
    use ureq::tls::{PemItem, RootCerts, TlsConfig};
    let pem = std::fs::read(path).map_err(|e| FlowerError::io(path, e))?;
    let certs: Vec<_> = ureq::tls::parse_pem(&pem)
        .filter_map(|item| match item {
            Ok(PemItem::Certificate(c)) => Some(c),
            _ => None,
        })
        .collect();
    if certs.is_empty() {
        return Err(FlowerError::Config(format!(
            "{}: no PEM certificate in the root CA file",
            path.display()
        )));
    }
    Ok(TlsConfig::builder()
        .root_certs(RootCerts::Specific(Arc::new(certs)))
        .build())
}

/// The readable part of a SuperLink error body (JSON with a message, or plain text).
fn error_text(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(v) => ["message", "detail", "error"]
            .iter()
            .find_map(|k| {
                v.get(*k)
                    .map(|m| m.as_str().map(str::to_string).unwrap_or(m.to_string()))
            })
            .unwrap_or_else(|| text.to_string()),
        Err(_) => text.chars().take(500).collect(),
    }
}
