//! IKEv2 wire format, RFC 7296 §3, in the Packet/Repr style: `parse` functions
//! take untrusted bytes and return owned representations or a [`WireError`]
//! (never a panic); `emit` functions write a representation back out.
//!
//! One file per payload group: [`header`], [`sa`] (SA/proposal/transform),
//! [`simple`] (KE, ID, AUTH, Notify, Delete), [`ts`] (traffic selectors),
//! [`cp`] (configuration). Nonce and Vendor ID bodies are plain bytes. The SK
//! payload (§3.14) is located here and opened by `crypto::sk`.

pub mod cp;
pub mod header;
mod reader;
pub mod sa;
pub mod simple;
pub mod ts;
pub mod types;

pub use cp::{CpAttribute, CpPayload};
pub use header::{HEADER_LEN, Header};
pub use sa::{Proposal, SaPayload, Transform};
pub use simple::{AuthPayload, DeletePayload, Identity, KePayload, NotifyPayload};
pub use ts::TrafficSelector;
pub use types::*;

use reader::Reader;

/// Length of the generic payload header, RFC 7296 §3.2.
pub const GENERIC_HEADER_LEN: usize = 4;

/// Why bytes could not be parsed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("message truncated")]
    Truncated,
    #[error("length field disagrees with the datagram")]
    BadLength,
    #[error("unsupported IKE major version {0}")]
    UnsupportedVersion(u8),
    #[error("unknown payload type {0} marked critical")]
    UnsupportedCritical(u8),
    #[error("malformed {payload:?} payload: {reason}")]
    Malformed {
        payload: PayloadType,
        reason: &'static str,
    },
    #[error("SK payload is not the last payload")]
    EncryptedNotLast,
}

/// One parsed payload. Types we know but do not use (CERT, CERTREQ, EAP, SKF)
/// are kept raw in `Other`; unknown non-critical types are dropped during parse.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Payload {
    Sa(SaPayload),
    Ke(KePayload),
    IdI(Identity),
    IdR(Identity),
    Auth(AuthPayload),
    Nonce(Vec<u8>),
    Notify(NotifyPayload),
    Delete(DeletePayload),
    VendorId(Vec<u8>),
    TsI(Vec<TrafficSelector>),
    TsR(Vec<TrafficSelector>),
    Cp(CpPayload),
    Other { ty: PayloadType, body: Vec<u8> },
}

impl Payload {
    pub fn payload_type(&self) -> PayloadType {
        match self {
            Payload::Sa(_) => PayloadType::SA,
            Payload::Ke(_) => PayloadType::KE,
            Payload::IdI(_) => PayloadType::IDI,
            Payload::IdR(_) => PayloadType::IDR,
            Payload::Auth(_) => PayloadType::AUTH,
            Payload::Nonce(_) => PayloadType::NONCE,
            Payload::Notify(_) => PayloadType::NOTIFY,
            Payload::Delete(_) => PayloadType::DELETE,
            Payload::VendorId(_) => PayloadType::VENDOR_ID,
            Payload::TsI(_) => PayloadType::TSI,
            Payload::TsR(_) => PayloadType::TSR,
            Payload::Cp(_) => PayloadType::CP,
            Payload::Other { ty, .. } => *ty,
        }
    }

    fn parse_body(ty: PayloadType, body: &[u8]) -> Result<Option<Self>, WireError> {
        Ok(Some(match ty {
            PayloadType::SA => Payload::Sa(SaPayload::parse(body)?),
            PayloadType::KE => Payload::Ke(KePayload::parse(body)?),
            PayloadType::IDI => Payload::IdI(Identity::parse(body)?),
            PayloadType::IDR => Payload::IdR(Identity::parse(body)?),
            PayloadType::AUTH => Payload::Auth(AuthPayload::parse(body)?),
            PayloadType::NONCE => Payload::Nonce(body.to_vec()),
            PayloadType::NOTIFY => Payload::Notify(NotifyPayload::parse(body)?),
            PayloadType::DELETE => Payload::Delete(DeletePayload::parse(body)?),
            PayloadType::VENDOR_ID => Payload::VendorId(body.to_vec()),
            PayloadType::TSI => Payload::TsI(ts::parse_ts_body(body)?),
            PayloadType::TSR => Payload::TsR(ts::parse_ts_body(body)?),
            PayloadType::CP => Payload::Cp(CpPayload::parse(body)?),
            PayloadType::CERT | PayloadType::CERTREQ | PayloadType::EAP | PayloadType::SKF => {
                Payload::Other {
                    ty,
                    body: body.to_vec(),
                }
            }
            _ => return Ok(None),
        }))
    }

    pub fn emit_body(&self, out: &mut Vec<u8>) {
        match self {
            Payload::Sa(p) => p.emit(out),
            Payload::Ke(p) => p.emit(out),
            Payload::IdI(p) | Payload::IdR(p) => p.emit(out),
            Payload::Auth(p) => p.emit(out),
            Payload::Nonce(b) | Payload::VendorId(b) => out.extend_from_slice(b),
            Payload::Notify(p) => p.emit(out),
            Payload::Delete(p) => p.emit(out),
            Payload::TsI(s) | Payload::TsR(s) => ts::emit_ts_body(s, out),
            Payload::Cp(p) => p.emit(out),
            Payload::Other { body, .. } => out.extend_from_slice(body),
        }
    }
}

/// Where the SK payload sits inside a message (§3.14).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EncryptedPart {
    /// Type of the first payload inside the encrypted chain.
    pub first_inner: PayloadType,
    /// Offset of the SK payload's generic header; everything before its body is
    /// the AEAD associated data (RFC 5282 §5.1).
    pub header_offset: usize,
}

impl EncryptedPart {
    pub fn body_offset(&self) -> usize {
        self.header_offset + GENERIC_HEADER_LEN
    }
}

/// A payload chain as parsed: cleartext payloads and the SK payload, if any.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chain {
    pub payloads: Vec<Payload>,
    pub encrypted: Option<EncryptedPart>,
}

/// Parses a payload chain starting with type `first` at `buf[start..]`.
///
/// `allow_encrypted` is true for the outer chain of a message: an SK payload
/// ends the chain and must be the last bytes of `buf` (§3.14). Unknown payload
/// types are skipped unless their Critical bit is set (§2.5).
pub fn parse_chain(
    first: PayloadType,
    buf: &[u8],
    start: usize,
    allow_encrypted: bool,
) -> Result<Chain, WireError> {
    let mut payloads = Vec::new();
    let mut next = first;
    let mut pos = start;
    let mut r = Reader::new(buf.get(start..).ok_or(WireError::Truncated)?);
    while next != PayloadType::NONE {
        let ty = next;
        let header_offset = pos;
        next = PayloadType(r.u8()?);
        let critical = r.u8()? & CRITICAL != 0;
        let len = r.u16()? as usize;
        if len < GENERIC_HEADER_LEN {
            return Err(WireError::BadLength);
        }
        let body = r.take(len - GENERIC_HEADER_LEN)?;
        pos += len;
        if ty == PayloadType::SK {
            if !allow_encrypted {
                return Err(WireError::Malformed {
                    payload: PayloadType::SK,
                    reason: "nested SK payload",
                });
            }
            if !r.is_empty() {
                return Err(WireError::EncryptedNotLast);
            }
            return Ok(Chain {
                payloads,
                encrypted: Some(EncryptedPart {
                    first_inner: next,
                    header_offset,
                }),
            });
        }
        match Payload::parse_body(ty, body)? {
            Some(p) => payloads.push(p),
            None if critical => return Err(WireError::UnsupportedCritical(ty.0)),
            None => {}
        }
    }
    if !r.is_empty() {
        return Err(WireError::BadLength);
    }
    Ok(Chain {
        payloads,
        encrypted: None,
    })
}

/// Emits a payload chain, filling in each generic header's Next Payload field.
/// Returns the type of the first payload (for the IKE header or SK payload).
pub fn emit_chain(payloads: &[Payload], out: &mut Vec<u8>) -> PayloadType {
    for (i, p) in payloads.iter().enumerate() {
        let next = payloads
            .get(i + 1)
            .map_or(PayloadType::NONE, Payload::payload_type);
        let start = out.len();
        out.push(next.0);
        out.push(0);
        out.extend_from_slice(&[0, 0]);
        p.emit_body(out);
        let len = (out.len() - start) as u16;
        out[start + 2..start + 4].copy_from_slice(&len.to_be_bytes());
    }
    payloads
        .first()
        .map_or(PayloadType::NONE, Payload::payload_type)
}

/// A whole cleartext message (used for IKE_SA_INIT and for tests).
pub fn emit_plain_message(mut header: Header, payloads: &[Payload]) -> Vec<u8> {
    let mut body = Vec::new();
    header.next_payload = emit_chain(payloads, &mut body);
    header.length = (HEADER_LEN + body.len()) as u32;
    let mut out = Vec::with_capacity(header.length as usize);
    header.emit(&mut out);
    out.extend_from_slice(&body);
    out
}

/// Parses a complete datagram: header plus outer chain.
pub fn parse_message(buf: &[u8]) -> Result<(Header, Chain), WireError> {
    let header = Header::parse(buf)?;
    let chain = parse_chain(header.next_payload, buf, HEADER_LEN, true)?;
    Ok((header, chain))
}

/// Convenience lookups over a parsed payload list.
pub trait PayloadsExt {
    fn notifies(&self) -> impl Iterator<Item = &NotifyPayload>;
    fn notify(&self, ty: NotifyType) -> Option<&NotifyPayload>;
    fn first_error_notify(&self) -> Option<&NotifyPayload>;
    /// The SA payload. The first one, if several.
    fn sa(&self) -> Option<&SaPayload>;
    /// The KE payload. The first one, if several.
    fn ke(&self) -> Option<&KePayload>;
    /// The initiator's identity (IDi). The first one, if several.
    fn id_i(&self) -> Option<&Identity>;
    /// The responder's identity (IDr). The first one, if several.
    fn id_r(&self) -> Option<&Identity>;
    /// The AUTH payload. The first one, if several.
    fn auth(&self) -> Option<&AuthPayload>;
    /// The initiator's traffic selectors (TSi). The first one, if several.
    fn ts_i(&self) -> Option<&Vec<TrafficSelector>>;
    /// The responder's traffic selectors (TSr). The first one, if several.
    fn ts_r(&self) -> Option<&Vec<TrafficSelector>>;
    /// The configuration payload. The first one, if several.
    fn cp(&self) -> Option<&CpPayload>;
    /// The nonce's bytes.
    fn nonce(&self) -> Option<&[u8]>;
}

impl PayloadsExt for [Payload] {
    fn notifies(&self) -> impl Iterator<Item = &NotifyPayload> {
        self.iter().filter_map(|p| match p {
            Payload::Notify(n) => Some(n),
            _ => None,
        })
    }

    fn notify(&self, ty: NotifyType) -> Option<&NotifyPayload> {
        self.notifies().find(|n| n.ty == ty)
    }

    fn first_error_notify(&self) -> Option<&NotifyPayload> {
        self.notifies().find(|n| n.ty.is_error())
    }

    fn sa(&self) -> Option<&SaPayload> {
        self.iter().find_map(|p| match p {
            Payload::Sa(x) => Some(x),
            _ => None,
        })
    }

    fn ke(&self) -> Option<&KePayload> {
        self.iter().find_map(|p| match p {
            Payload::Ke(x) => Some(x),
            _ => None,
        })
    }

    fn id_i(&self) -> Option<&Identity> {
        self.iter().find_map(|p| match p {
            Payload::IdI(x) => Some(x),
            _ => None,
        })
    }

    fn id_r(&self) -> Option<&Identity> {
        self.iter().find_map(|p| match p {
            Payload::IdR(x) => Some(x),
            _ => None,
        })
    }

    fn auth(&self) -> Option<&AuthPayload> {
        self.iter().find_map(|p| match p {
            Payload::Auth(x) => Some(x),
            _ => None,
        })
    }

    fn ts_i(&self) -> Option<&Vec<TrafficSelector>> {
        self.iter().find_map(|p| match p {
            Payload::TsI(x) => Some(x),
            _ => None,
        })
    }

    fn ts_r(&self) -> Option<&Vec<TrafficSelector>> {
        self.iter().find_map(|p| match p {
            Payload::TsR(x) => Some(x),
            _ => None,
        })
    }

    fn cp(&self) -> Option<&CpPayload> {
        self.iter().find_map(|p| match p {
            Payload::Cp(x) => Some(x),
            _ => None,
        })
    }

    fn nonce(&self) -> Option<&[u8]> {
        self.iter().find_map(|p| match p {
            Payload::Nonce(n) => Some(n.as_slice()),
            _ => None,
        })
    }
}

/// How the owner of a datagram should route it to an IKE SA.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// A request opening a new IKE SA (IKE_SA_INIT with a zero responder SPI).
    /// Hand it to the half-open SA for `(peer address, initiator_spi)` if one
    /// exists (a retransmission), otherwise to [`crate::Endpoint::accept`].
    /// [`crate::Router::route`] keeps that table and the admission limits.
    NewSa { initiator_spi: u64 },
    /// Any other message: look up the IKE SA whose local SPI is `local_spi`.
    Existing { local_spi: u64 },
    /// Not an IKEv2 message we could ever act on.
    Drop,
}

/// Decides where a datagram goes from its header alone (RFC 7296 §2.1: our own
/// SPI is the responder SPI when the peer sets the Initiator flag).
pub fn route(datagram: &[u8]) -> Route {
    let Some(h) = Header::peek(datagram) else {
        return Route::Drop;
    };
    if h.initiator && h.spi_r == 0 {
        if !h.response && h.exchange == ExchangeType::IKE_SA_INIT && h.message_id == 0 {
            return Route::NewSa {
                initiator_spi: h.spi_i,
            };
        }
        return Route::Drop;
    }
    if h.spi_i == 0 {
        return Route::Drop;
    }
    // The peer set the Initiator flag: we are the original responder.
    let local_spi = if h.initiator { h.spi_r } else { h.spi_i };
    Route::Existing { local_spi }
}
