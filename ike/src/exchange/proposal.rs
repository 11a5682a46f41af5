//! Building our SA offers and choosing from the peer's (RFC 7296 §2.7, §3.3).

use crate::config::{EspPolicy, IkePolicy};
use crate::crypto::{DhGroup, EncrAlg, EspSuite, IkeSuite, PrfAlg};
use crate::error::PeerError;
use crate::wire::{Proposal, ProtocolId, SaPayload, Transform, TransformType, dh_id, esn_id};

pub(crate) fn ike_offer(policy: &IkePolicy, spi: Vec<u8>, ke_group: DhGroup) -> SaPayload {
    let mut transforms: Vec<Transform> = policy.encr.iter().map(|e| e.transform()).collect();
    transforms.extend(policy.prf.iter().map(|p| p.transform()));
    // The group we send a KE for goes first, so a responder honouring our
    // order picks it and no INVALID_KE round trip is needed.
    transforms.push(ke_group.transform());
    transforms.extend(
        policy
            .dh
            .iter()
            .filter(|g| **g != ke_group)
            .map(|g| g.transform()),
    );
    SaPayload {
        proposals: vec![Proposal {
            number: 1,
            protocol: ProtocolId::IKE,
            spi,
            transforms,
        }],
    }
}

pub(crate) fn esp_offer(policy: &EspPolicy, spi: u32, pfs: Option<DhGroup>) -> SaPayload {
    let mut transforms: Vec<Transform> = policy.encr.iter().map(|e| e.transform()).collect();
    if let Some(g) = pfs {
        transforms.push(g.transform());
    }
    for esn in &policy.esn {
        transforms.push(Transform::new(
            TransformType::ESN,
            if *esn { esn_id::ESN } else { esn_id::NO_ESN },
        ));
    }
    SaPayload {
        proposals: vec![Proposal {
            number: 1,
            protocol: ProtocolId::ESP,
            spi: spi.to_be_bytes().to_vec(),
            transforms,
        }],
    }
}

/// The one-proposal SA payload of a response.
pub(crate) fn ike_chosen(number: u8, spi: Vec<u8>, suite: &IkeSuite) -> SaPayload {
    SaPayload {
        proposals: vec![Proposal {
            number,
            protocol: ProtocolId::IKE,
            spi,
            transforms: vec![
                suite.encr.transform(),
                suite.prf.transform(),
                suite.dh.transform(),
            ],
        }],
    }
}

pub(crate) fn esp_chosen(number: u8, spi: u32, suite: &EspSuite) -> SaPayload {
    let mut transforms = vec![suite.encr.transform()];
    if let Some(g) = suite.dh {
        transforms.push(g.transform());
    }
    transforms.push(Transform::new(
        TransformType::ESN,
        if suite.esn {
            esn_id::ESN
        } else {
            esn_id::NO_ESN
        },
    ));
    SaPayload {
        proposals: vec![Proposal {
            number,
            protocol: ProtocolId::ESP,
            spi: spi.to_be_bytes().to_vec(),
            transforms,
        }],
    }
}

fn usable(p: &Proposal, ty: TransformType) -> impl Iterator<Item = &Transform> {
    p.transforms
        .iter()
        .filter(move |t| t.ty == ty && !t.has_unknown_attribute)
}

fn pick_encr(p: &Proposal, ours: &[EncrAlg]) -> Option<EncrAlg> {
    let theirs: Vec<EncrAlg> = usable(p, TransformType::ENCR)
        .filter_map(EncrAlg::from_transform)
        .collect();
    ours.iter().copied().find(|e| theirs.contains(e))
}

/// With an AEAD cipher a proposal may carry no integrity algorithm other
/// than NONE (RFC 5282 §8, RFC 7296 §3.3).
fn integrity_ok(p: &Proposal) -> bool {
    let integ: Vec<&Transform> = p
        .transforms
        .iter()
        .filter(|t| t.ty == TransformType::INTEG)
        .collect();
    integ.is_empty() || integ.iter().any(|t| t.id == 0)
}

fn dh_ids(p: &Proposal) -> Vec<u16> {
    usable(p, TransformType::DH).map(|t| t.id).collect()
}

/// Picks a DH group: the peer's KE group if acceptable, else our favourite.
fn pick_dh(theirs: &[u16], ours: &[DhGroup], ke_group: Option<u16>) -> Option<DhGroup> {
    if let Some(g) = ke_group.and_then(DhGroup::from_id)
        && theirs.contains(&g.id())
        && ours.contains(&g)
    {
        return Some(g);
    }
    ours.iter().copied().find(|g| theirs.contains(&g.id()))
}

pub(crate) struct SelectedIke {
    pub number: u8,
    pub suite: IkeSuite,
    pub peer_spi: Vec<u8>,
}

/// Chooses an IKE proposal. The caller checks the KE group against `suite.dh`
/// and answers INVALID_KE_PAYLOAD on mismatch.
pub(crate) fn select_ike(
    policy: &IkePolicy,
    sa: &SaPayload,
    ke_group: Option<u16>,
) -> Result<SelectedIke, PeerError> {
    for p in &sa.proposals {
        if p.protocol != ProtocolId::IKE || !integrity_ok(p) {
            continue;
        }
        let Some(encr) = pick_encr(p, &policy.encr) else {
            continue;
        };
        let prfs: Vec<PrfAlg> = usable(p, TransformType::PRF)
            .filter_map(PrfAlg::from_transform)
            .collect();
        let Some(prf) = policy.prf.iter().copied().find(|x| prfs.contains(x)) else {
            continue;
        };
        let Some(dh) = pick_dh(&dh_ids(p), &policy.dh, ke_group) else {
            continue;
        };
        return Ok(SelectedIke {
            number: p.number,
            suite: IkeSuite { encr, prf, dh },
            peer_spi: p.spi.clone(),
        });
    }
    Err(PeerError::NoProposalChosen)
}

pub(crate) struct SelectedEsp {
    pub number: u8,
    pub suite: EspSuite,
    pub peer_spi: u32,
}

/// Chooses an ESP proposal. In IKE_AUTH there is no KE, so DH transforms
/// are ignored (§1.2); in CREATE_CHILD_SA a proposal that requires PFS needs a
/// KE payload of the chosen group.
pub(crate) fn select_esp(
    policy: &EspPolicy,
    sa: &SaPayload,
    ke_group: Option<u16>,
    in_ike_auth: bool,
) -> Result<SelectedEsp, PeerError> {
    let mut wanted_group = None;
    for p in &sa.proposals {
        if p.protocol != ProtocolId::ESP || p.spi.len() != 4 || !integrity_ok(p) {
            continue;
        }
        let peer_spi = u32::from_be_bytes([p.spi[0], p.spi[1], p.spi[2], p.spi[3]]);
        let Some(encr) = pick_encr(p, &policy.encr) else {
            continue;
        };
        let esns: Vec<bool> = usable(p, TransformType::ESN)
            .filter_map(|t| match t.id {
                esn_id::NO_ESN => Some(false),
                esn_id::ESN => Some(true),
                _ => None,
            })
            .collect();
        let esn = if esns.is_empty() {
            false
        } else {
            match policy.esn.iter().copied().find(|e| esns.contains(e)) {
                Some(e) => e,
                None => continue,
            }
        };
        let dh = if in_ike_auth {
            None
        } else {
            let theirs = dh_ids(p);
            let none_ok = theirs.is_empty() || theirs.contains(&dh_id::NONE);
            match (ke_group, pick_dh(&theirs, &policy.pfs, ke_group)) {
                (None, _) if none_ok => None,
                (None, Some(g)) => {
                    wanted_group.get_or_insert(g);
                    continue;
                }
                (Some(k), Some(g)) if k == g.id() => Some(g),
                (Some(_), Some(g)) => {
                    wanted_group.get_or_insert(g);
                    continue;
                }
                (Some(_), None) if none_ok => None,
                _ => continue,
            }
        };
        return Ok(SelectedEsp {
            number: p.number,
            suite: EspSuite { encr, esn, dh },
            peer_spi,
        });
    }
    match wanted_group {
        Some(wanted) => Err(PeerError::WrongKeGroup { wanted }),
        None => Err(PeerError::NoProposalChosen),
    }
}

/// Checks that the responder's single chosen proposal is within our offer.
pub(crate) fn accept_ike(policy: &IkePolicy, sa: &SaPayload) -> Result<SelectedIke, PeerError> {
    let Some(p) = sa.proposals.first().filter(|_| sa.proposals.len() == 1) else {
        return Err(PeerError::ProposalNotOffered);
    };
    // A chosen proposal has exactly one transform of each type (§3.3.6).
    let mut types: Vec<TransformType> = p.transforms.iter().map(|t| t.ty).collect();
    types.sort();
    let n = types.len();
    types.dedup();
    if n != types.len() {
        return Err(PeerError::ProposalNotOffered);
    }
    select_ike(policy, sa, None).map_err(|_| PeerError::ProposalNotOffered)
}

pub(crate) fn accept_esp(
    policy: &EspPolicy,
    sa: &SaPayload,
    ke_group: Option<u16>,
    in_ike_auth: bool,
) -> Result<SelectedEsp, PeerError> {
    if sa.proposals.len() != 1 {
        return Err(PeerError::ProposalNotOffered);
    }
    select_esp(policy, sa, ke_group, in_ike_auth).map_err(|_| PeerError::ProposalNotOffered)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::wire::Identity;

    fn esp(transforms: Vec<Transform>) -> SaPayload {
        SaPayload {
            proposals: vec![Proposal {
                number: 1,
                protocol: ProtocolId::ESP,
                spi: vec![0, 0, 1, 0],
                transforms,
            }],
        }
    }

    fn gcm128() -> Transform {
        EncrAlg::AES128_GCM16.transform()
    }

    fn esn(on: bool) -> Transform {
        Transform::new(
            TransformType::ESN,
            if on { esn_id::ESN } else { esn_id::NO_ESN },
        )
    }

    #[test]
    fn ike_auth_ignores_dh_and_honours_esn_choice() {
        let policy = Config::new(Identity::fqdn("gw")).esp;
        let offer = esp(vec![gcm128(), DhGroup::Curve25519.transform(), esn(true)]);
        let s = select_esp(&policy, &offer, None, true).unwrap();
        assert_eq!(
            s.suite,
            EspSuite {
                encr: EncrAlg::AES128_GCM16,
                esn: true,
                dh: None
            }
        );
        assert_eq!(s.peer_spi, 256);
        // Both offered: our policy order (no ESN first) decides.
        let offer = esp(vec![gcm128(), esn(true), esn(false)]);
        assert!(!select_esp(&policy, &offer, None, true).unwrap().suite.esn);
    }

    #[test]
    fn create_child_sa_needs_a_matching_ke_for_pfs() {
        let policy = Config::new(Identity::fqdn("gw")).esp;
        let offer = esp(vec![gcm128(), DhGroup::Ecp256.transform(), esn(false)]);
        let ecp = Some(DhGroup::Ecp256.id());
        assert_eq!(
            select_esp(&policy, &offer, ecp, false).unwrap().suite.dh,
            Some(DhGroup::Ecp256)
        );
        // KE for another group, or none, while the proposal requires PFS.
        let x = Some(DhGroup::Curve25519.id());
        assert!(matches!(
            select_esp(&policy, &offer, x, false),
            Err(PeerError::WrongKeGroup {
                wanted: DhGroup::Ecp256
            })
        ));
        assert!(matches!(
            select_esp(&policy, &offer, None, false),
            Err(PeerError::WrongKeGroup { .. })
        ));
        // NONE among the DH transforms makes PFS optional.
        let optional = esp(vec![
            gcm128(),
            DhGroup::Ecp256.transform(),
            Transform::new(TransformType::DH, dh_id::NONE),
            esn(false),
        ]);
        assert_eq!(
            select_esp(&policy, &optional, None, false)
                .unwrap()
                .suite
                .dh,
            None
        );
    }

    #[test]
    fn aead_proposals_with_integrity_are_refused() {
        let policy = Config::new(Identity::fqdn("gw")).ike;
        let mut p = ike_offer(&policy, vec![], DhGroup::Curve25519);
        assert!(select_ike(&policy, &p, Some(DhGroup::Curve25519.id())).is_ok());
        // AUTH_HMAC_SHA2_256_128 next to an AEAD cipher (RFC 5282 §8).
        p.proposals[0]
            .transforms
            .push(Transform::new(TransformType::INTEG, 12));
        assert!(matches!(
            select_ike(&policy, &p, None),
            Err(PeerError::NoProposalChosen)
        ));
    }

    #[test]
    fn ke_group_of_the_initiator_is_preferred_when_acceptable() {
        let policy = Config::new(Identity::fqdn("gw")).ike;
        let p = ike_offer(&policy, vec![], DhGroup::Ecp256);
        let s = select_ike(&policy, &p, Some(DhGroup::Ecp256.id())).unwrap();
        assert_eq!(s.suite.dh, DhGroup::Ecp256);
        // Unknown KE group: our favourite among the offered ones.
        let s = select_ike(&policy, &p, Some(999)).unwrap();
        assert_eq!(s.suite.dh, DhGroup::Curve25519);
    }
}
