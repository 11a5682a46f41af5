//! Which kernel XFRM states and policies belong to this node, and clearing them.
//!
//! The kernel's XFRM tables are shared by everything on the host (or network namespace): this
//! node, a key manager such as strongSwan, an operator's `ip xfrm`. Every state and policy the
//! [`super::XfrmDriver`] installs therefore carries a reqid from this node's [`ReqidRange`] (a
//! state in `xfrm_usersa_info.reqid`, a policy in its template's `xfrm_user_tmpl.reqid`; the
//! kernel pairs a policy with the states of the same reqid), and that reqid is how the node
//! recognises its own objects later, in particular those a killed process left behind:
//!
//! ```text
//!  XfrmDriver::new ──► flush_owned(range)
//!                        1. GETSA dump     ──► reqid in range? ──► DELSA (dst, SPI, proto, mark)
//!                        2. GETPOLICY dump ──► a template's reqid in range? ──► DELPOLICY (index)
//!                        everything else (strongSwan's, the operator's) is left alone
//!
//!  start ──► install_sa:     NEWSA ── EEXIST ──► GETSA: ours? ── DELSA, NEWSA again
//!                                                        └ not ours: refused, left alone
//!        └─► install_policy: NEWPOLICY ── EEXIST ──► GETPOLICY: ours? ── UPDPOLICY (replace)
//!                                                              └ not ours: refused, left alone
//! ```
//!
//! Why flush at all: a process killed with SIGKILL removes nothing. Its outbound states keep
//! encrypting, unfenced, until their last lease (hard packet limit) runs out, and its
//! policies make the next start fail with EEXIST. States go first, so nothing keeps
//! encrypting, then policies: in between, a policy without states drops what it matches rather
//! than send it in the clear. Once the flush is done, traffic those policies matched follows
//! ordinary routing until the node starts children again (as on a host that never ran one).
//!
//! States are deleted, not updated, on EEXIST: XFRM_MSG_UPDSA replaces lifetimes but does not
//! move replay counters (`oseq`, `seq`), and a reinstalled state must start exactly at the
//! lease's `next_seq - 1` and the replay floor.
//!
//! Larval states made by the kernel's ACQUIRE (SPI 0) cannot be addressed by DELSA; they hold
//! no keys and expire by themselves (`net.core.xfrm_acq_expires`, 30 s by default).
//!
//! The reqid convention is this project's, not a standard: reqids are a Linux XFRM (and
//! PF_KEY `sadb_x_sa2_reqid`) notion. Key managers allocate theirs upwards from small numbers
//! (by default strongSwan from 1, libreswan from 16384); node ranges live in the upper half of
//! the u32 space.

use std::collections::HashSet;
use std::fmt;
use std::net::IpAddr;

use netlink_packet_core::{NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST};
use netlink_packet_xfrm::policy::{
    DelGetMessage as PolicyDelGetMessage, ModifyMessage as PolicyModifyMessage,
};
use netlink_packet_xfrm::state::{
    DelGetMessage as StateDelGetMessage, ModifyMessage as StateModifyMessage,
};
use netlink_packet_xfrm::{Address, UserPolicyId, UserSaId, XfrmAttrs, XfrmMessage};

use super::msg::PolicyDir;
use super::netlink::{NetlinkError, XfrmNetlink};

const ADD: u16 = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
const ACK: u16 = NLM_F_REQUEST | NLM_F_ACK;
const DUMP: u16 = NLM_F_REQUEST | NLM_F_DUMP;

/// A contiguous range of XFRM reqids that belongs to one node: `base ..= base + len - 1`.
///
/// The first one (`base`) is kept for the driver's ESP probe state; children get the others.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct ReqidRange {
    /// The first reqid of the range.
    pub base: u32,
    /// How many reqids the range holds.
    pub len: u32,
}

impl ReqidRange {
    /// Where node ranges start: the upper half of the reqid space, far above what key managers
    /// allocate by default (strongSwan counts from 1, libreswan from 16384).
    pub const NODES_BASE: u32 = 0x8000_0000;
    /// Reqids per node: 2^20, so a node can run a million children at once.
    pub const PER_NODE: u32 = 1 << 20;
    /// How many distinct node ranges fit above [`ReqidRange::NODES_BASE`] (2048).
    pub const NODE_SLOTS: u64 = ((u32::MAX - Self::NODES_BASE) / Self::PER_NODE + 1) as u64;

    /// The range of node `node_id`: `0x8000_0000 + (node_id mod 2048) × 2^20`, 2^20 long.
    ///
    /// Nodes that share one kernel (one network namespace) must have ids that differ modulo
    /// 2048, or each would flush the other's states; cluster nodes on their own hosts never
    /// meet in one XFRM table.
    pub const fn for_node(node_id: u64) -> ReqidRange {
        ReqidRange {
            base: Self::NODES_BASE + (node_id % Self::NODE_SLOTS) as u32 * Self::PER_NODE,
            len: Self::PER_NODE,
        }
    }

    /// Whether `reqid` is in the range.
    pub fn contains(&self, reqid: u32) -> bool {
        reqid >= self.base && reqid - self.base < self.len
    }

    /// The last reqid of the range (meaningless for an empty range).
    pub fn last(&self) -> u32 {
        self.base.wrapping_add(self.len.wrapping_sub(1))
    }

    /// Why the range cannot be used, if it cannot: it must not include reqid 0 (in a policy
    /// template, 0 means "any state"), must fit in 32 bits, and must hold the probe's reqid
    /// and at least one child's.
    pub fn check(&self) -> Result<(), String> {
        if self.base == 0 {
            return Err(
                "reqid 0 means \"any\" to the kernel; the range must start above it".into(),
            );
        }
        if self.len < 2 {
            return Err(format!("{self} holds fewer than 2 reqids"));
        }
        if u64::from(self.base) + u64::from(self.len) > 1 << 32 {
            return Err(format!("{self} runs past 2^32"));
        }
        Ok(())
    }
}

impl fmt::Display for ReqidRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "reqids {:#x}..={:#x}", self.base, self.last())
    }
}

/// Hands out the children's reqids: `base + 1 ..= last` of a range (`base` is the probe's),
/// round robin from the last one given, so a reqid just freed is not reused at once.
#[derive(Debug)]
pub(crate) struct ReqidAllocator {
    range: ReqidRange,
    in_use: HashSet<u32>,
    next: u32,
}

impl ReqidAllocator {
    pub(crate) fn new(range: ReqidRange) -> ReqidAllocator {
        ReqidAllocator {
            range,
            in_use: HashSet::new(),
            next: range.base.wrapping_add(1),
        }
    }

    /// A reqid no running child has, or `None` when all are taken.
    pub(crate) fn allocate(&mut self) -> Option<u32> {
        let first = self.range.base.wrapping_add(1);
        for _ in 0..self.range.len.saturating_sub(1) {
            let reqid = self.next;
            self.next = if reqid == self.range.last() {
                first
            } else {
                reqid + 1
            };
            if self.in_use.insert(reqid) {
                return Some(reqid);
            }
        }
        None
    }

    pub(crate) fn release(&mut self, reqid: u32) {
        self.in_use.remove(&reqid);
    }
}

/// A state [`flush_owned`] removed.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct FlushedState {
    /// Outer source address.
    pub src: IpAddr,
    /// Outer destination address.
    pub dst: IpAddr,
    /// SPI.
    pub spi: u32,
    /// IP protocol (50: ESP).
    pub proto: u8,
    /// Its reqid.
    pub reqid: u32,
}

impl fmt::Display for FlushedState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "state {} → {} proto {} spi {:08x} reqid {:#x}",
            self.src, self.dst, self.proto, self.spi, self.reqid
        )
    }
}

/// A policy [`flush_owned`] removed.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct FlushedPolicy {
    /// Direction.
    pub dir: PolicyDir,
    /// Selector source prefix.
    pub src: (IpAddr, u8),
    /// Selector destination prefix.
    pub dst: (IpAddr, u8),
    /// The kernel's index of the policy.
    pub index: u32,
    /// Its priority.
    pub priority: u32,
    /// The reqid (of its first template in the range).
    pub reqid: u32,
}

impl fmt::Display for FlushedPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "policy {:?} {}/{} → {}/{} priority {} reqid {:#x}",
            self.dir, self.src.0, self.src.1, self.dst.0, self.dst.1, self.priority, self.reqid
        )
    }
}

/// What [`flush_owned`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FlushReport {
    /// States removed (reqid in the range).
    pub states: Vec<FlushedState>,
    /// Policies removed (a template's reqid in the range).
    pub policies: Vec<FlushedPolicy>,
    /// States left alone (someone else's).
    pub states_kept: usize,
    /// Policies left alone (someone else's).
    pub policies_kept: usize,
    /// Larval states of ours made by the kernel's ACQUIRE (SPI 0): DELSA cannot address them;
    /// they hold no keys and expire by themselves.
    pub larval_left: usize,
}

impl FlushReport {
    /// Whether nothing was removed.
    pub fn is_empty(&self) -> bool {
        self.states.is_empty() && self.policies.is_empty()
    }
}

fn ip_of(family: u16, address: &Address) -> IpAddr {
    if family == libc::AF_INET6 as u16 {
        IpAddr::V6(address.to_ipv6())
    } else {
        IpAddr::V4(address.to_ipv4())
    }
}

fn is_gone(e: &NetlinkError) -> bool {
    e.errno == libc::ESRCH || e.errno == libc::ENOENT
}

/// Removes the XFRM states whose reqid is in `range` and the policies with a template whose
/// reqid is, in the calling thread's network namespace, and leaves everything else alone.
/// Objects that vanish meanwhile are skipped; any other refusal ends the flush with its error.
pub fn flush_owned(netlink: &XfrmNetlink, range: ReqidRange) -> Result<FlushReport, NetlinkError> {
    let mut report = FlushReport::default();
    // 1. states: stop what a killed predecessor may still be encrypting
    for sa in netlink.dump_states()? {
        let info = &sa.user_sa_info;
        if !range.contains(info.reqid) {
            report.states_kept += 1;
            continue;
        }
        if info.id.spi == 0 {
            report.larval_left += 1;
            continue;
        }
        let mut nlas = vec![XfrmAttrs::SrcAddr(info.saddr)];
        // a marked state is only found with its mark (xfrm_user_state_lookup)
        nlas.extend(
            sa.nlas
                .iter()
                .filter(|nla| matches!(nla, XfrmAttrs::Mark(_)))
                .cloned(),
        );
        let delete = StateDelGetMessage {
            user_sa_id: UserSaId {
                daddr: info.id.daddr,
                spi: info.id.spi,
                family: info.family,
                proto: info.id.proto,
            },
            nlas,
        };
        match netlink.request("DELSA (flush)", XfrmMessage::DeleteSa(delete), ACK) {
            Ok(_) => report.states.push(FlushedState {
                src: ip_of(info.family, &info.saddr),
                dst: ip_of(info.family, &info.id.daddr),
                spi: info.id.spi,
                proto: info.id.proto,
                reqid: info.reqid,
            }),
            Err(e) if is_gone(&e) => {}
            Err(e) => return Err(e),
        }
    }
    // 2. policies
    let policies = netlink.request(
        "GETPOLICY (dump)",
        XfrmMessage::GetPolicy(PolicyDelGetMessage::default()),
        DUMP,
    )?;
    for answer in policies {
        let XfrmMessage::AddPolicy(policy) = answer else {
            continue;
        };
        let info = &policy.user_policy_info;
        let owned_reqid = template_reqids(&policy).find(|&reqid| range.contains(reqid));
        let (Some(reqid), Some(dir)) = (owned_reqid, PolicyDir::from_code(info.direction)) else {
            report.policies_kept += 1;
            continue;
        };
        // by index: exact whatever the selector; mark, interface id and type must match too
        // (xfrm_policy_byid)
        let delete = PolicyDelGetMessage {
            user_policy_id: UserPolicyId {
                selector: info.selector,
                index: info.index,
                direction: info.direction,
            },
            nlas: policy
                .nlas
                .iter()
                .filter(|nla| {
                    matches!(
                        nla,
                        XfrmAttrs::Mark(_) | XfrmAttrs::IfId(_) | XfrmAttrs::PolicyType(_)
                    )
                })
                .cloned()
                .collect(),
        };
        match netlink.request("DELPOLICY (flush)", XfrmMessage::DeletePolicy(delete), ACK) {
            Ok(_) => {
                let family = info.selector.family;
                report.policies.push(FlushedPolicy {
                    dir,
                    src: (
                        ip_of(family, &info.selector.saddr),
                        info.selector.prefixlen_s,
                    ),
                    dst: (
                        ip_of(family, &info.selector.daddr),
                        info.selector.prefixlen_d,
                    ),
                    index: info.index,
                    priority: info.priority,
                    reqid,
                });
            }
            Err(e) if is_gone(&e) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(report)
}

/// The reqids of a policy's templates (what ties it to the states it requires).
pub fn template_reqids(policy: &PolicyModifyMessage) -> impl Iterator<Item = u32> + '_ {
    policy
        .nlas
        .iter()
        .filter_map(|nla| match nla {
            XfrmAttrs::Template(templates) => Some(templates.iter().map(|t| t.reqid)),
            _ => None,
        })
        .flatten()
}

/// Adds a state (NEWSA). If one with the same destination, SPI and protocol exists and is
/// ours (its reqid is in `owned`: a leftover), it is deleted and the state added again; one
/// that is not ours is left alone and the install refused with EEXIST.
pub fn install_sa(
    netlink: &XfrmNetlink,
    op: &'static str,
    message: StateModifyMessage,
    owned: ReqidRange,
) -> Result<(), NetlinkError> {
    let first = netlink.request(op, XfrmMessage::AddSa(message.clone()), ADD);
    match first {
        Err(e) if e.errno == libc::EEXIST => {}
        other => return other.map(drop),
    }
    let info = &message.user_sa_info;
    let id = StateDelGetMessage {
        user_sa_id: UserSaId {
            daddr: info.id.daddr,
            spi: info.id.spi,
            family: info.family,
            proto: info.id.proto,
        },
        nlas: vec![XfrmAttrs::SrcAddr(info.saddr)],
    };
    let existing = netlink.request(
        "GETSA (existing)",
        XfrmMessage::GetSa(id.clone()),
        NLM_F_REQUEST,
    );
    let reqid = match existing.as_deref() {
        Ok([XfrmMessage::AddSa(sa), ..]) => Some(sa.user_sa_info.reqid),
        _ => None,
    };
    match reqid {
        Some(reqid) if owned.contains(reqid) => {
            tracing::warn!(
                spi = format_args!("{:08x}", info.id.spi),
                reqid,
                "replacing a state of ours that was already installed"
            );
            match netlink.request("DELSA (replace)", XfrmMessage::DeleteSa(id), ACK) {
                Err(e) if !is_gone(&e) => return Err(e),
                _ => {}
            }
            netlink
                .request(op, XfrmMessage::AddSa(message), ADD)
                .map(drop)
        }
        other => Err(NetlinkError {
            op,
            errno: libc::EEXIST,
            detail: format!(
                "SPI {:08x} to {} is taken by a state that is not this node's (reqid {}, \
                 not in {owned}); left alone",
                info.id.spi,
                ip_of(info.family, &info.id.daddr),
                other.map_or_else(|| "unknown".to_owned(), |r| format!("{r:#x}")),
            ),
        }),
    }
}

/// Adds a policy (NEWPOLICY). If one with the same selector and direction exists and is ours
/// (a template's reqid is in `owned`), it is replaced with XFRM_MSG_UPDPOLICY; one that is not
/// ours is left alone and the install refused with EEXIST.
pub fn install_policy(
    netlink: &XfrmNetlink,
    message: PolicyModifyMessage,
    owned: ReqidRange,
) -> Result<(), NetlinkError> {
    let first = netlink.request("NEWPOLICY", XfrmMessage::AddPolicy(message.clone()), ADD);
    match first {
        Err(e) if e.errno == libc::EEXIST => {}
        other => return other.map(drop),
    }
    let info = &message.user_policy_info;
    let id = PolicyDelGetMessage {
        user_policy_id: UserPolicyId {
            selector: info.selector,
            index: 0,
            direction: info.direction,
        },
        nlas: Vec::new(),
    };
    let existing = netlink.request(
        "GETPOLICY (existing)",
        XfrmMessage::GetPolicy(id),
        NLM_F_REQUEST,
    );
    let ours = match existing.as_deref() {
        Ok([XfrmMessage::AddPolicy(policy), ..]) => {
            template_reqids(policy).any(|reqid| owned.contains(reqid))
        }
        _ => false,
    };
    if !ours {
        let sel = &info.selector;
        return Err(NetlinkError {
            op: "NEWPOLICY",
            errno: libc::EEXIST,
            detail: format!(
                "a policy for {}/{} → {}/{} (dir {}) that is not this node's (no template \
                 reqid in {owned}) is already installed; left alone",
                ip_of(sel.family, &sel.saddr),
                sel.prefixlen_s,
                ip_of(sel.family, &sel.daddr),
                sel.prefixlen_d,
                info.direction
            ),
        });
    }
    netlink
        .request("UPDPOLICY", XfrmMessage::UpdatePolicy(message), ACK)
        .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ranges_are_disjoint_and_clear_of_key_managers() {
        let first = ReqidRange::for_node(0);
        assert_eq!(
            first,
            ReqidRange {
                base: 0x8000_0000,
                len: 0x10_0000
            }
        );
        assert_eq!(ReqidRange::NODE_SLOTS, 2048);
        let one = ReqidRange::for_node(1);
        assert_eq!(one.base, 0x8010_0000);
        assert_eq!(one.to_string(), "reqids 0x80100000..=0x801fffff");
        assert!(one.contains(0x8010_0000) && one.contains(0x801f_ffff));
        assert!(!one.contains(0x8020_0000) && !one.contains(0x800f_ffff));
        assert!(
            !one.contains(1) && !one.contains(16384),
            "strongSwan's, libreswan's"
        );
        let top = ReqidRange::for_node(2047);
        assert_eq!(top.last(), u32::MAX);
        assert!(top.contains(u32::MAX));
        assert_eq!(ReqidRange::for_node(2048), first, "ids wrap modulo 2048");
        for node in [0, 1, 2, 3, 1000, 2047, 2048, u64::MAX] {
            ReqidRange::for_node(node).check().unwrap();
        }
        assert!(
            ReqidRange { base: 0, len: 10 }.check().is_err(),
            "reqid 0 is a wildcard"
        );
        assert!(ReqidRange { base: 5, len: 1 }.check().is_err());
        assert!(
            ReqidRange {
                base: u32::MAX,
                len: 2
            }
            .check()
            .is_err()
        );
        assert!(!ReqidRange { base: 5, len: 0 }.contains(5));
    }

    #[test]
    fn children_get_every_reqid_but_the_probes_round_robin() {
        let range = ReqidRange { base: 100, len: 4 };
        let mut reqids = ReqidAllocator::new(range);
        assert_eq!(
            (reqids.allocate(), reqids.allocate(), reqids.allocate()),
            (Some(101), Some(102), Some(103))
        );
        assert_eq!(reqids.allocate(), None, "100 is the probe's");
        reqids.release(102);
        assert_eq!(reqids.allocate(), Some(102));
        reqids.release(101);
        reqids.release(103);
        assert_eq!(
            reqids.allocate(),
            Some(103),
            "round robin: not the one freed first"
        );
        assert_eq!(reqids.allocate(), Some(101));
        let top = ReqidRange::for_node(2047);
        let mut reqids = ReqidAllocator::new(top);
        reqids.next = u32::MAX;
        assert_eq!(reqids.allocate(), Some(u32::MAX));
        assert_eq!(
            reqids.allocate(),
            Some(top.base + 1),
            "wraps inside the range"
        );
    }
}
