//! Membership changes led by a node that joined later (needs root: the ClusterIP lab).
//!
//! A node being added replicates the log from its start, so for a while its view of the
//! membership is an old one. When the leader itself joined after the first members, that old
//! view does not hold the leader: a node that checked replication against its own view refused
//! the leader's appends as "not a member", could never reach the entry that adds the leader,
//! and never joined (`evpc-chaos tunnels`, add-node in a second round). Here more than a
//! replication batch of entries (1,024) is written, node 4 joins and becomes the leader, and
//! node 5 must then join and catch up.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use evpc_dataplane::netns::root_or_skip;
use evpc_node::ike_gateway::{IkeSettings, PskSecret, PskSetting};
use evpc_testkit::lab::{Lab, LabSpec};

/// More entries than one append carries (`max_payload_entries` in `node::config`).
const ENTRIES: usize = 1_100;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_joins_under_a_leader_that_joined_after_the_first_members() {
    if !root_or_skip("membership (a ClusterIP lab of up to five nodes)") {
        return;
    }
    let ike = IkeSettings {
        local_id: "gw.example".into(),
        psk: vec![PskSetting {
            peer: "client.example".into(),
            secret: PskSecret::new("a-key-nobody-uses-in-this-test"),
            remote_ts: None,
        }],
        pool: Some("10.10.0.0/24".into()),
        local_ts: vec!["10.10.0.0/24".into()],
        ..IkeSettings::default()
    };
    let spec = LabSpec::new(
        3,
        "join",
        PathBuf::from(env!("CARGO_BIN_EXE_evpc-node")),
        ike,
    );
    let mut lab = Lab::start(spec).await.expect("3-node lab");

    // More entries than one append carries before node 4 joins (drain node 2 and make it
    // active again), so that a newcomer's first append ends before the entry that adds node 4.
    let mut admin = lab.admin().expect("admin client");
    admin.follow_leader().await.expect("a leader");
    let before = admin.status(false).await.expect("status").last_log_index;
    for _ in 0..ENTRIES.div_ceil(2) {
        admin.drain_node(2).await.expect("DrainNode 2");
        admin.activate_node(2).await.expect("ActivateNode 2");
        // under the admin rate limit (200 calls a second)
        tokio::time::sleep(Duration::from_millis(12)).await;
    }
    let after = admin.status(false).await.expect("status").last_log_index;
    assert!(after >= before + ENTRIES as u64, "{before} → {after}");

    let four = lab.add_node().await.expect("node 4 joins");
    // A transfer can end in an election another node wins (on two busy cores node 4 may not
    // have been the first to time out): ask again, as an operator would, a few times.
    for attempt in 1..=4 {
        let mut admin = lab.admin().expect("admin client");
        admin.follow_leader().await.expect("a leader");
        match admin.transfer_leader(four).await {
            Ok(_) => break,
            Err(e) if attempt < 4 => eprintln!("TransferLeader to {four}, attempt {attempt}: {e}"),
            Err(e) => panic!("TransferLeader to {four}, {attempt} attempts: {e}"),
        }
    }
    wait_for("node 4 to lead", || async {
        let mut admin = lab.admin().ok()?;
        let status = admin.follow_leader().await.ok()?;
        (status.leader_id == Some(four)).then_some(())
    })
    .await;

    let five = lab
        .add_node()
        .await
        .unwrap_or_else(|e| panic!("node 5 joins under node 4: {e:#}"));
    let status = wait_for("node 5 to vote and catch up", || async {
        let mut admin = lab.admin().ok()?;
        let status = admin.follow_leader().await.ok()?;
        let member = status.members.iter().find(|m| m.id == five)?;
        (member.voter && member.matched_index >= Some(status.last_log_index)).then_some(status)
    })
    .await;
    assert_eq!(status.leader_id, Some(four), "{status:?}");
    // (a ping from node 4 may be refused while node 5 still catches up: pings need a member)
    let log = lab.log(five);
    for call in ["StreamAppend", "AppendEntries", "InstallSnapshot"] {
        assert!(
            !log.contains(&format!("{call}: node {four} is not a member")),
            "node 5 refused its leader's {call}:\n{log}"
        );
    }
}

/// Polls `check` until it yields, for at most 30 s.
async fn wait_for<T, F, Fut>(what: &str, check: F) -> T
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
