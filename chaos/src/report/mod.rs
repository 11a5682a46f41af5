//! The report of `evpc-chaos tunnels`: its data model (embedded in the runner's JSON report, so it
//! serializes both ways), voice quality as the E-model rates it ([`emodel`]), and one
//! self-contained HTML page with plots ([`html::render_html`]).
//!
//! The model holds what the page shows, already measured: the runner fills it, this module does no
//! measuring. Times are milliseconds throughout.

pub mod emodel;
pub mod html;
mod svg;

use std::fmt;

use serde::{Deserialize, Serialize};

pub use emodel::CallQuality;

use crate::stats::Percentiles;

/// A run of `evpc-chaos tunnels`, as the HTML report shows it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TunnelsReport {
    /// Title of the page.
    pub title: String,
    /// When the run started (as the runner writes it, e.g. RFC 3339).
    pub date: String,
    /// The command line that ran it.
    pub command: String,
    /// The machine it ran on (CPU, cores, kernel).
    pub machine: String,
    /// The lab: nodes, clients and how they are connected.
    pub topology: String,
    /// Headline figures: nodes, clients (strongSwan / ours), faults run, duration…
    pub summary: Vec<SummaryRow>,
    /// The invariants checked over the whole run.
    pub invariants: Vec<InvariantRow>,
    /// Interruptions per fault kind and protocol.
    pub interruptions: Vec<FaultSeries>,
    /// The 2014 paper's figures to compare with.
    pub paper: Vec<PaperFigure>,
    /// One fault of each kind, seen from the nodes' data planes.
    pub timelines: Vec<Timeline>,
    /// Voice quality of whole calls, with and without faults.
    pub calls: Vec<CallRow>,
    /// Per fault kind: interruption percentiles and losses.
    pub per_fault: Vec<FaultTableRow>,
}

/// One line of the summary table.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SummaryRow {
    /// What is counted ("nodes", "clients (strongSwan / evpc)").
    pub label: String,
    /// Its value, formatted by the runner.
    pub value: String,
}

/// One invariant and whether the run kept it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct InvariantRow {
    /// The invariant ("nonce reuse on the wire").
    pub name: String,
    /// What was measured ("0 of 48,213,004 packets").
    pub value: String,
    /// Whether it held.
    pub passed: bool,
    /// Evidence, e.g. the first violation: both packets' times and senders (may span lines).
    pub detail: String,
}

/// The transport a measurement was made on.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// The voice-like UDP stream: interruption is the longest gap beyond its 20 ms spacing.
    #[default]
    Udp,
    /// TCP bulk: interruption is the longest time without progress.
    Tcp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Udp => "UDP",
            Protocol::Tcp => "TCP",
        })
    }
}

/// The interruptions one kind of fault caused on one protocol.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FaultSeries {
    /// The fault kind ("kill-owner", "transfer", …).
    pub kind: String,
    /// Which stream was measured.
    pub protocol: Protocol,
    /// One interruption per affected SA per fault (ms).
    pub samples_ms: Vec<f64>,
    /// The target the 99th percentile should stay under, if there is one (ms).
    pub target_p99_ms: Option<f64>,
}

/// A figure of the 2014 paper (Palomares, Migault, Laurent, "Elastic Virtual Private Cloud",
/// Q2SWINET 2014) drawn beside the fault kind it compares with.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PaperFigure {
    /// The fault kind it compares with: "transfer" for the paper's planned transfer (TM),
    /// "kill-owner" for its failover (HA).
    pub kind: String,
    /// Which stream the paper measured.
    pub protocol: Protocol,
    /// The paper's interruption (ms).
    pub ms: f64,
    /// How to label it ("paper TM, UDP").
    pub label: String,
}

/// One fault seen from the data planes: packets per time bin, per node.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Timeline {
    /// What happened ("kill-owner: node-2 killed, 412 SAs taken over").
    pub label: String,
    /// The fault kind.
    pub kind: String,
    /// Width of a bin (ms), e.g. 10.
    pub bin_ms: f64,
    /// Time of the first bin's start (ms, on the same axis as `fault_at_ms`).
    pub start_ms: f64,
    /// When the fault was injected (ms).
    pub fault_at_ms: f64,
    /// When the affected streams all flowed again (ms), if they did within the window.
    pub recovered_at_ms: Option<f64>,
    /// Per node, the downstream ESP packets it sent to clients in each bin.
    pub nodes: Vec<NodeSeries>,
    /// Optionally, per client stream, the packets it received in each bin.
    pub streams: Vec<StreamSeries>,
}

/// One node's packets per bin.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeSeries {
    /// The node ("node-1").
    pub node: String,
    /// Downstream ESP packets sent per bin.
    pub packets: Vec<u32>,
}

/// One client stream's packets received per bin.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StreamSeries {
    /// The stream ("client-17 udp").
    pub label: String,
    /// Packets received per bin.
    pub received: Vec<u32>,
}

/// The voice quality of one call.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CallRow {
    /// What the call went through ("2-min call, kill-owner at 60 s").
    pub label: String,
    /// The fault during the call, or `None` for a call without one (the baseline the others'
    /// MOS is compared with: the first such row).
    pub fault: Option<String>,
    /// Its rating.
    pub quality: CallQuality,
}

/// Median, 99th percentile and maximum of some interruptions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Spread {
    /// Median (ms).
    pub p50_ms: f64,
    /// 99th percentile (ms).
    pub p99_ms: f64,
    /// Maximum (ms).
    pub max_ms: f64,
    /// Number of samples (0: the others mean nothing).
    pub count: usize,
}

impl Spread {
    /// Nearest-rank spread of `samples_ms` (non-finite values ignored; all zero when empty).
    pub fn of(samples_ms: &[f64]) -> Spread {
        let sorted = sorted_finite(samples_ms);
        Spread {
            p50_ms: percentile(&sorted, 50.0),
            p99_ms: percentile(&sorted, 99.0),
            max_ms: sorted.last().copied().unwrap_or(0.0),
            count: sorted.len(),
        }
    }
}

impl From<Percentiles> for Spread {
    fn from(p: Percentiles) -> Spread {
        Spread {
            p50_ms: p.p50,
            p99_ms: p.p99,
            max_ms: p.max,
            count: p.count,
        }
    }
}

/// One line of the per-fault table.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FaultTableRow {
    /// The fault kind.
    pub kind: String,
    /// Faults of this kind injected.
    pub count: usize,
    /// UDP interruptions.
    pub udp: Spread,
    /// TCP stalls.
    pub tcp: Spread,
    /// UDP packets lost over all faults of this kind.
    pub packets_lost: u64,
    /// The share of these faults during which no packet was lost (%), where it applies (planned
    /// transfers, drains).
    pub zero_loss_pct: Option<f64>,
}

/// The `p`-th percentile (0 ≤ `p` ≤ 100) of ascending `sorted` values by nearest rank, as
/// [`crate::stats::Percentiles`] computes them: the smallest value with at least `p` % of the
/// values at or below it. 0 when `sorted` is empty.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (p.clamp(0.0, 100.0) / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The finite values of `values`, ascending.
fn sorted_finite(values: &[f64]) -> Vec<f64> {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    sorted.sort_by(f64::total_cmp);
    sorted
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_by_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert_eq!(percentile(&v, 25.0), 25.0);
        assert_eq!(percentile(&v, 25.5), 26.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
        assert_eq!(percentile(&[7.0], 5.0), 7.0);
        // Agrees with crate::stats.
        let mut ms = vec![3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0];
        let spread = Spread::of(&ms);
        let stats = Spread::from(Percentiles::of_ms(&mut ms));
        assert_eq!(spread, stats);
    }

    #[test]
    fn spread_ignores_non_finite() {
        let spread = Spread::of(&[f64::NAN, 2.0, f64::INFINITY, 1.0]);
        assert_eq!(spread.count, 2);
        assert_eq!(spread.max_ms, 2.0);
        assert_eq!(Spread::of(&[]), Spread::default());
    }

    #[test]
    fn round_trips_through_json() {
        let report = TunnelsReport {
            title: "t".into(),
            interruptions: vec![FaultSeries {
                kind: "kill-owner".into(),
                protocol: Protocol::Tcp,
                samples_ms: vec![1.5, 2.0],
                target_p99_ms: Some(500.0),
            }],
            ..TunnelsReport::default()
        };
        let json = serde_json::to_string(&report).unwrap();
        assert!(json.contains("\"protocol\":\"tcp\""), "{json}");
        let back: TunnelsReport = serde_json::from_str(&json).unwrap();
        assert_eq!(back, report);
        // Missing sections load as empty.
        let partial: TunnelsReport = serde_json::from_str(r#"{"title":"x"}"#).unwrap();
        assert_eq!(partial.title, "x");
        assert!(partial.timelines.is_empty());
    }
}
