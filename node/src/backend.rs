//! Choosing and starting the data plane the configuration asks for.
//!
//! ```text
//!  "none"       control plane only
//!  "probe"      ProbeDriver: test traffic reported to a collector
//!  "userspace"  UserspaceDriver: cluster UDP 4500/500 <-> ESP <-> TUN, in this process
//!  "xfrm"       XfrmDriver: the Linux kernel; refuses on a kernel without ESP, and then
//!               falls back to "userspace" if `fallback_to_userspace` is set
//! ```
//!
//! The userspace and xfrm backends own the cluster sockets, so they also carry IKE: datagrams
//! for the IKE engine come out of their channel, answers go back through [`IkeSocket`].

use std::net::IpAddr;
use std::sync::Arc;

use evpc_dataplane::SaDriver;
use evpc_dataplane::ike::{IkeReceiver, IkeSocket};
use evpc_dataplane::probe::{ProbeDriver, Traffic};
use evpc_dataplane::userspace::{TunConfig, UserspaceConfig, UserspaceDriver};
use evpc_dataplane::xfrm::{ReqidRange, XfrmConfig, XfrmDriver};

use crate::config::{DataplaneConfig, parse_prefix};
use crate::node::Node;

/// A running data plane.
pub struct Backend {
    /// The SA driver the owner runtime uses.
    pub driver: Arc<dyn SaDriver>,
    /// The cluster sockets' IKE side, for the IKE engine.
    pub ike: Option<(Arc<dyn IkeSocket>, IkeReceiver)>,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend")
            .field("driver", &self.driver.name())
            .field("ike", &self.ike.is_some())
            .finish()
    }
}

fn userspace_config(config: &DataplaneConfig, cluster: IpAddr) -> anyhow::Result<UserspaceConfig> {
    let parse = |list: &[String]| -> anyhow::Result<Vec<(IpAddr, u8)>> {
        list.iter()
            .map(|p| parse_prefix(p).map_err(anyhow::Error::msg))
            .collect()
    };
    let mut tun = TunConfig::named(&config.tun.name);
    tun.mtu = config.tun.mtu;
    tun.addresses = parse(&config.tun.addresses)?;
    tun.routes = parse(&config.tun.routes)?;
    let mut us = UserspaceConfig::new(cluster, tun);
    if let Some(port) = config.natt_port {
        us.natt_port = port;
    }
    if let Some(port) = config.ike_port {
        us.ike_port = (port != 0).then_some(port);
    }
    if let Some(window) = config.replay_window {
        us.replay_window = window;
    }
    Ok(us)
}

fn userspace(node: &Arc<Node>, cluster: IpAddr) -> anyhow::Result<Backend> {
    let config = userspace_config(&node.config.dataplane, cluster)?;
    let tun = config.tun.name.clone();
    let (driver, ike_rx) = UserspaceDriver::new(config, node.gate.clone())
        .map_err(|e| anyhow::anyhow!("starting the userspace data plane (TUN {tun}): {e}"))?;
    let driver = Arc::new(driver);
    Ok(Backend {
        driver: driver.clone(),
        ike: Some((driver, ike_rx)),
    })
}

/// Starts the configured data plane, if any.
pub fn start(node: &Arc<Node>) -> anyhow::Result<Option<Backend>> {
    let config = &node.config.dataplane;
    let cluster = || {
        config
            .cluster_address
            .ok_or_else(|| anyhow::anyhow!("dataplane.cluster_address is required"))
    };
    Ok(Some(match config.backend.as_str() {
        "" | "none" => return Ok(None),
        "probe" => {
            let collector = config
                .probe
                .collector
                .ok_or_else(|| anyhow::anyhow!("dataplane.probe.collector is required"))?;
            Backend {
                driver: Arc::new(ProbeDriver::start(
                    node.id,
                    config.probe.run,
                    collector,
                    Traffic {
                        pps: config.probe.pps_per_child,
                        burst_factor: config.probe.burst_factor.max(1),
                    },
                    node.gate.clone(),
                )?),
                ike: None,
            }
        }
        "userspace" => userspace(node, cluster()?)?,
        "xfrm" => {
            let mut xc = XfrmConfig::new(cluster()?);
            // Every kernel state and policy this node installs carries a reqid of its own
            // range, so the driver can flush what a crashed process left (and only that).
            xc.reqids = ReqidRange::for_node(node.id);
            if let Some(port) = config.natt_port {
                xc.natt_port = port;
            }
            if let Some(port) = config.ike_port {
                xc.ike_port = (port != 0).then_some(port);
            }
            if let Some(window) = config.replay_window {
                xc.replay_window = window;
            }
            match XfrmDriver::new(xc, node.gate.clone()) {
                Ok((driver, ike_rx)) => {
                    let driver = Arc::new(driver);
                    Backend {
                        driver: driver.clone(),
                        ike: Some((driver, ike_rx)),
                    }
                }
                Err(e) if config.fallback_to_userspace => {
                    tracing::warn!(reason = %e, "kernel data plane unavailable; falling back to the userspace data plane");
                    userspace(node, cluster()?)?
                }
                Err(e) => anyhow::bail!(
                    "the kernel (xfrm) data plane cannot run: {e}; set dataplane.backend = \"userspace\" or dataplane.fallback_to_userspace = true"
                ),
            }
        }
        other => anyhow::bail!("unknown data plane backend {other:?}"),
    }))
}
