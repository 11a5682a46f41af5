//! Errors. [`PeerError`] is what a peer (or the network) did wrong; each maps,
//! through an exhaustive `match`, to the notification we answer with or to a
//! silent drop where RFC 7296 says so. [`ApiError`] is caller misuse.

use crate::crypto::DhGroup;
use crate::crypto::sk::SkError;
use crate::wire::{ExchangeType, NotifyType, PayloadType, WireError};

/// Peer misbehaviour or an unacceptable request.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    #[error("malformed message: {0}")]
    Malformed(WireError),
    #[error("unsupported IKE major version {0}")]
    UnsupportedVersion(u8),
    #[error("unknown payload type {0} marked critical")]
    UnsupportedCriticalPayload(u8),
    #[error("SK payload failed the integrity check")]
    IntegrityCheckFailed,
    #[error("encrypted payloads are malformed: {0}")]
    MalformedInner(WireError),
    #[error("message ID {got} outside the window (expected {expected})")]
    MessageIdOutOfWindow { got: u32, expected: u32 },
    #[error("response with message ID {got} does not match an outstanding request")]
    UnexpectedResponse { got: u32 },
    #[error("message for an unknown IKE SA")]
    UnknownIkeSpi,
    #[error("Initiator flag inconsistent with the SA roles")]
    WrongInitiatorFlag,
    #[error("exchange {0:?} not allowed in the current state")]
    UnexpectedExchange(ExchangeType),
    #[error("missing {0:?} payload")]
    MissingPayload(PayloadType),
    #[error("{0:?} payload not allowed here")]
    UnexpectedPayload(PayloadType),
    #[error("nonce length {0} outside 16..=256")]
    BadNonceLength(usize),
    #[error("no acceptable proposal")]
    NoProposalChosen,
    #[error("proposal in a response was not one we offered")]
    ProposalNotOffered,
    #[error("KE payload is for another group; we want {wanted:?}")]
    WrongKeGroup { wanted: DhGroup },
    #[error("invalid KE public value")]
    InvalidKePublicValue,
    #[error("no credentials for the peer identity")]
    UnknownPeerIdentity,
    #[error("peer asked for an identity that is not ours")]
    WrongResponderIdentity,
    #[error("authentication method {0} not supported")]
    UnsupportedAuthMethod(u8),
    #[error("AUTH payload did not verify")]
    AuthenticationFailed,
    #[error("traffic selectors not acceptable")]
    TsUnacceptable,
    #[error("a child SA needs an inner address, but the peer sent no CP request for one")]
    InnerAddressRequired,
    #[error("local policy refused the child SA's traffic selectors (they overlap another SA's)")]
    TsOverlap,
    #[error("traffic selectors in the response are not within the ones we proposed")]
    TsNotProposed,
    #[error("no inner address available")]
    InternalAddressFailure,
    #[error("child SA with SPI {spi:#010x} not found")]
    ChildSaNotFound { spi: u32 },
    #[error("request collides with an exchange in progress")]
    TemporaryFailure,
    #[error("peer answered with error notification {0:?}")]
    PeerNotified(NotifyType),
    #[error("SA is half-open for too long or closing")]
    SaNotUsable,
}

/// What to do about a [`PeerError`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reaction {
    /// Answer the request with this error notification.
    Notify(NotifyType),
    /// Drop the message without answering.
    Drop,
}

impl PeerError {
    /// The RFC 7296 reaction. No wildcard arm: a new variant must be mapped.
    pub fn reaction(&self) -> Reaction {
        use NotifyType as N;
        use Reaction::{Drop, Notify};
        match self {
            PeerError::Malformed(_) => Notify(N::INVALID_SYNTAX),
            PeerError::UnsupportedVersion(_) => Notify(N::INVALID_MAJOR_VERSION),
            PeerError::UnsupportedCriticalPayload(_) => Notify(N::UNSUPPORTED_CRITICAL_PAYLOAD),
            // §2.21: a failed integrity check is dropped, never answered.
            PeerError::IntegrityCheckFailed => Drop,
            PeerError::MalformedInner(WireError::UnsupportedCritical(_)) => {
                Notify(N::UNSUPPORTED_CRITICAL_PAYLOAD)
            }
            PeerError::MalformedInner(_) => Notify(N::INVALID_SYNTAX),
            // §2.3 / §3.10.1: INVALID_MESSAGE_ID must not be sent in a response.
            PeerError::MessageIdOutOfWindow { .. } => Drop,
            PeerError::UnexpectedResponse { .. } => Drop,
            // §2.21.4: INVALID_IKE_SPI is optional and unprotected; we stay silent.
            PeerError::UnknownIkeSpi => Drop,
            PeerError::WrongInitiatorFlag => Drop,
            PeerError::UnexpectedExchange(_) => Notify(N::INVALID_SYNTAX),
            PeerError::MissingPayload(_) => Notify(N::INVALID_SYNTAX),
            PeerError::UnexpectedPayload(_) => Notify(N::INVALID_SYNTAX),
            PeerError::BadNonceLength(_) => Notify(N::INVALID_SYNTAX),
            PeerError::NoProposalChosen => Notify(N::NO_PROPOSAL_CHOSEN),
            PeerError::ProposalNotOffered => Drop,
            PeerError::WrongKeGroup { .. } => Notify(N::INVALID_KE_PAYLOAD),
            PeerError::InvalidKePublicValue => Notify(N::INVALID_SYNTAX),
            PeerError::UnknownPeerIdentity => Notify(N::AUTHENTICATION_FAILED),
            PeerError::WrongResponderIdentity => Notify(N::AUTHENTICATION_FAILED),
            PeerError::UnsupportedAuthMethod(_) => Notify(N::AUTHENTICATION_FAILED),
            PeerError::AuthenticationFailed => Notify(N::AUTHENTICATION_FAILED),
            PeerError::TsUnacceptable => Notify(N::TS_UNACCEPTABLE),
            // §3.10.1: CP(CFG_REQUEST) was expected but not received; §1.2:
            // in IKE_AUTH only the child fails, the IKE SA stays up.
            PeerError::InnerAddressRequired => Notify(N::FAILED_CP_REQUIRED),
            // §2.9 / §3.10.1: the narrowed selectors conflict with local
            // policy (another SA holds them); the peer may try others.
            PeerError::TsOverlap => Notify(N::TS_UNACCEPTABLE),
            // Found in a response, which gets no answer; we just do not
            // install the child (§2.9: the responder may only narrow).
            PeerError::TsNotProposed => Drop,
            PeerError::InternalAddressFailure => Notify(N::INTERNAL_ADDRESS_FAILURE),
            PeerError::ChildSaNotFound { .. } => Notify(N::CHILD_SA_NOT_FOUND),
            PeerError::TemporaryFailure => Notify(N::TEMPORARY_FAILURE),
            // A peer's own error notification is information, never answered.
            PeerError::PeerNotified(_) => Drop,
            PeerError::SaNotUsable => Drop,
        }
    }

    /// Notification data that goes with the reaction (§3.10.1).
    pub fn notify_data(&self) -> Vec<u8> {
        match self {
            PeerError::WrongKeGroup { wanted } => wanted.id().to_be_bytes().to_vec(),
            PeerError::UnsupportedCriticalPayload(ty)
            | PeerError::MalformedInner(WireError::UnsupportedCritical(ty)) => vec![*ty],
            PeerError::UnsupportedVersion(_) => vec![],
            _ => vec![],
        }
    }

    /// The notification SPI/protocol for CHILD_SA_NOT_FOUND (§2.25).
    pub fn notify_spi(&self) -> Option<u32> {
        match self {
            PeerError::ChildSaNotFound { spi } => Some(*spi),
            _ => None,
        }
    }
}

impl From<WireError> for PeerError {
    fn from(e: WireError) -> Self {
        match e {
            WireError::UnsupportedVersion(v) => PeerError::UnsupportedVersion(v),
            WireError::UnsupportedCritical(t) => PeerError::UnsupportedCriticalPayload(t),
            other => PeerError::Malformed(other),
        }
    }
}

impl From<SkError> for PeerError {
    fn from(e: SkError) -> Self {
        match e {
            SkError::Integrity => PeerError::IntegrityCheckFailed,
            SkError::Inner(w) => PeerError::MalformedInner(w),
        }
    }
}

/// Caller misuse of the API.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    #[error("the IKE SA is not established")]
    NotEstablished,
    #[error("the IKE SA is closed")]
    Closed,
    #[error("no inner address was requested")]
    NoAddressRequested,
    #[error("no child SA with inbound SPI {0:#010x}")]
    NoSuchChild(u32),
    #[error("snapshot format {0} is not supported")]
    UnsupportedSnapshot(u32),
    #[error("snapshot is inconsistent: {0}")]
    InvalidSnapshot(&'static str),
}
