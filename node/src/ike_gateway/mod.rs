//! The IKE gateway: the `evpc-ike` engine wired to the cluster — commit before respond, the
//! replicated address pool, takeover of SAs from the committed state. (Being written.)

use std::sync::Arc;

use evpc_dataplane::ike::{IkeReceiver, IkeSocket};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::node::Node;

/// `[ike]` in node.toml.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IkeSettings {
    /// Our identity (IDr), e.g. "gw.example".
    pub local_id: String,
}

impl IkeSettings {
    /// Checks the settings; the message says what to change.
    pub fn validate(&self) -> Result<(), String> {
        if self.local_id.is_empty() {
            return Err("ike.local_id must be set".into());
        }
        Ok(())
    }
}

/// Runs the gateway until `shutdown`.
pub async fn run(
    _node: Arc<Node>,
    _socket: Arc<dyn IkeSocket>,
    _datagrams: IkeReceiver,
    _shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    anyhow::bail!("the IKE gateway is not built yet")
}
