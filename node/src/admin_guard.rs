//! Who may call what on admin.v1, how often, and the audit log of every write.
//!
//! ```text
//!  request ──► Caller::of (certificate) ──► role allows the call? ──► rate budget left?
//!                                              │ no: PERMISSION_DENIED      │ no: RESOURCE_EXHAUSTED
//!                                              ▼                            ▼
//!                                         audit line              AdminService (the work)
//!                                                                           │
//!                                              audit line (who, what, result) ◄┘  writes only
//! ```
//!
//! [`GuardedAdmin`] wraps [`AdminService`] and implements admin.v1 itself: the work stays in
//! one place and the rules in another. Roles (see [`Role`]): `reader` reads, `operator` moves
//! and removes SAs, `admin` changes the cluster. Audit lines go to the `evpc::audit` target,
//! one per write, refused ones included.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use evpc_proto::admin::v1 as pb;
use evpc_proto::admin::v1::admin_server::Admin;
use tonic::{Request, Response, Status};

use crate::admin_service::AdminService;
use crate::pki::Role;
use crate::tls::Caller;

/// Callers whose budgets are tracked at once; past it, full (idle) budgets are forgotten.
const MAX_TRACKED_CALLERS: usize = 4096;

/// admin.v1 with authorization, rate limits and auditing around [`AdminService`].
#[derive(Debug)]
pub struct GuardedAdmin {
    inner: AdminService,
    tls_on: bool,
    budgets: Mutex<Budgets>,
}

/// A token bucket per caller.
#[derive(Debug)]
struct Budgets {
    per_second: f64,
    burst: f64,
    callers: HashMap<String, (f64, Instant)>,
}

impl Budgets {
    /// Takes one call from `who`'s budget; `false` if it is spent.
    fn take(&mut self, who: &str, now: Instant) -> bool {
        if self.callers.len() >= MAX_TRACKED_CALLERS && !self.callers.contains_key(who) {
            let (rate, burst) = (self.per_second, self.burst);
            self.callers.retain(|_, (tokens, at)| {
                *tokens + now.duration_since(*at).as_secs_f64() * rate < burst
            });
            if self.callers.len() >= MAX_TRACKED_CALLERS {
                return false;
            }
        }
        let (tokens, at) = self
            .callers
            .entry(who.to_owned())
            .or_insert((self.burst, now));
        *tokens =
            (*tokens + now.duration_since(*at).as_secs_f64() * self.per_second).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

impl GuardedAdmin {
    /// Guards `inner` with the node's TLS setting and `[limits]`.
    pub fn new(inner: AdminService) -> GuardedAdmin {
        let node = inner.node();
        let limits = &node.config.limits;
        GuardedAdmin {
            tls_on: node.tls.is_some(),
            budgets: Mutex::new(Budgets {
                per_second: f64::from(limits.admin_requests_per_second),
                burst: f64::from(limits.admin_burst),
                callers: HashMap::new(),
            }),
            inner,
        }
    }

    /// Who is calling, if they may make `call`, which needs `needed`, and have budget left.
    fn admit<T>(&self, request: &Request<T>, needed: Role, call: &str) -> Result<Caller, Status> {
        let caller = Caller::of(request, self.tls_on).inspect_err(|status| {
            tracing::warn!(target: "evpc::audit", call, result = %status.message(), "refused")
        })?;
        let allowed = match &caller {
            Caller::Operator { role, .. } => role.allows(needed),
            Caller::Plaintext => true,
            Caller::Node(_) => false,
        };
        if !allowed {
            let status = Status::permission_denied(match &caller {
                Caller::Node(id) => format!(
                    "{call}: node {id}'s certificate has no role on admin.v1; use an operator \
                     certificate (evpc-node pki issue-client)"
                ),
                _ => format!("{call} needs the {needed} role; {caller} may not"),
            });
            tracing::warn!(target: "evpc::audit", who = %caller, call, result = %status.message(), "refused");
            return Err(status);
        }
        let key = match &caller {
            Caller::Operator { name, .. } => name.clone(),
            other => other.to_string(),
        };
        let spent = !self
            .budgets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take(&key, Instant::now());
        if spent {
            metrics::counter!("evpc_admin_rate_limited_total").increment(1);
            return Err(Status::resource_exhausted(format!(
                "{caller} is over the admin.v1 rate limit ({}/s, burst {}); slow down",
                self.inner.node().config.limits.admin_requests_per_second,
                self.inner.node().config.limits.admin_burst
            )));
        }
        Ok(caller)
    }
}

/// One audit line for a write.
fn audit<T>(who: &Caller, call: &str, what: &str, result: &Result<Response<T>, Status>) {
    match result {
        Ok(_) => {
            tracing::info!(target: "evpc::audit", who = %who, call, request = what, result = "ok", "admin write")
        }
        Err(status) => tracing::warn!(
            target: "evpc::audit",
            who = %who,
            call,
            request = what,
            result = ?status.code(),
            message = status.message(),
            "admin write failed"
        ),
    }
}

/// What a request asks for, short enough for one log line.
fn summary<T: std::fmt::Debug>(request: &T) -> String {
    let mut text = format!("{request:?}");
    if text.len() > 300 {
        let mut end = 300;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}

macro_rules! guarded {
    ($( $method:ident($request:ty) -> $response:ty: $role:ident, $call:literal, $summary:expr; )*) => {
        #[tonic::async_trait]
        impl Admin for GuardedAdmin {
            $(
                async fn $method(
                    &self,
                    request: Request<$request>,
                ) -> Result<Response<$response>, Status> {
                    let who = self.admit(&request, Role::$role, $call)?;
                    if Role::$role == Role::Reader {
                        return Admin::$method(&self.inner, request).await;
                    }
                    let what: String = ($summary)(request.get_ref());
                    let result = Admin::$method(&self.inner, request).await;
                    audit(&who, $call, &what, &result);
                    result
                }
            )*
        }
    };
}

guarded! {
    status(pb::StatusRequest) -> pb::StatusResponse: Reader, "Status", summary;
    list_slots(pb::ListSlotsRequest) -> pb::ListSlotsResponse: Reader, "ListSlots", summary;
    list_sas(pb::ListSasRequest) -> pb::ListSasResponse: Reader, "ListSas", summary;
    get_sa(pb::GetSaRequest) -> pb::SaInfo: Reader, "GetSa", summary;
    transfer_sa(pb::TransferSaRequest) -> pb::TransferSaResponse: Operator, "TransferSa", summary;
    drain_node(pb::NodeRequest) -> pb::NodeStateResponse: Operator, "DrainNode", summary;
    activate_node(pb::NodeRequest) -> pb::NodeStateResponse: Operator, "ActivateNode", summary;
    rebalance(pb::RebalanceRequest) -> pb::RebalanceResponse: Operator, "Rebalance", summary;
    snapshot(pb::SnapshotRequest) -> pb::SnapshotResponse: Operator, "Snapshot", summary;
    delete_sa(pb::DeleteSaRequest) -> pb::DeleteSaResponse: Operator, "DeleteSa", summary;
    export_sa(pb::ExportSaRequest) -> pb::ExportSaResponse: Operator, "ExportSa", summary;
    import_sa(pb::ImportSaRequest) -> pb::ImportSaResponse: Operator, "ImportSa",
        |r: &pb::ImportSaRequest| format!("ImportSaRequest {{ context: {} bytes, .. }}", r.context.len());
    initialize(pb::InitializeRequest) -> pb::InitializeResponse: Admin, "Initialize", summary;
    add_member(pb::AddMemberRequest) -> pb::MembershipResponse: Admin, "AddMember", summary;
    remove_member(pb::RemoveMemberRequest) -> pb::MembershipResponse: Admin, "RemoveMember", summary;
    transfer_leader(pb::TransferLeaderRequest) -> pb::TransferLeaderResponse: Admin, "TransferLeader", summary;
    // The cluster's sealing key: the cluster's own setting, like membership.
    rotate_key(pb::RotateKeyRequest) -> pb::RotateKeyResponse: Admin, "RotateKey", summary;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn budgets_refill_at_the_rate_and_cap_at_the_burst() {
        let mut b = Budgets {
            per_second: 10.0,
            burst: 3.0,
            callers: HashMap::new(),
        };
        let t0 = Instant::now();
        assert!((0..3).all(|_| b.take("a", t0)));
        assert!(!b.take("a", t0), "the burst is spent");
        assert!(b.take("b", t0), "budgets are per caller");
        assert!(
            b.take("a", t0 + Duration::from_millis(100)),
            "one token after 100 ms"
        );
        assert!(!b.take("a", t0 + Duration::from_millis(100)));
        let later = t0 + Duration::from_secs(60);
        assert!((0..3).all(|_| b.take("a", later)));
        assert!(!b.take("a", later), "idle time refills at most the burst");
    }

    #[test]
    fn summaries_are_one_short_line() {
        let long = "x".repeat(1000);
        assert!(summary(&long).chars().count() <= 301);
        assert_eq!(summary(&3), "3");
    }
}
