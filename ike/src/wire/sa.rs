//! Security Association payload: proposals and transforms, RFC 7296 §3.3.

use super::WireError;
use super::reader::Reader;
use super::types::{ATTR_KEY_LENGTH, PayloadType, ProtocolId, TransformType};

const LAST: u8 = 0;
/// "More" value of a proposal substructure, RFC 7296 §3.3.1.
const MORE_PROPOSALS: u8 = 2;
/// "More" value of a transform substructure, RFC 7296 §3.3.2.
const MORE_TRANSFORMS: u8 = 3;
/// Attribute Format bit: TV when set, TLV when clear (RFC 7296 §3.3.5).
const ATTR_TV: u16 = 0x8000;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SaPayload {
    pub proposals: Vec<Proposal>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Proposal {
    /// 1-based; a response echoes the number of the proposal it accepted (§3.3.1).
    pub number: u8,
    pub protocol: ProtocolId,
    /// Empty in IKE_SA_INIT, 8 octets for an IKE rekey, 4 octets for ESP/AH.
    pub spi: Vec<u8>,
    pub transforms: Vec<Transform>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transform {
    pub ty: TransformType,
    pub id: u16,
    pub key_length: Option<u16>,
    /// An attribute we do not understand makes the transform unusable (§3.3.6).
    pub has_unknown_attribute: bool,
}

impl Transform {
    pub fn new(ty: TransformType, id: u16) -> Self {
        Self {
            ty,
            id,
            key_length: None,
            has_unknown_attribute: false,
        }
    }

    pub fn with_key_length(ty: TransformType, id: u16, bits: u16) -> Self {
        Self {
            ty,
            id,
            key_length: Some(bits),
            has_unknown_attribute: false,
        }
    }
}

fn malformed(reason: &'static str) -> WireError {
    WireError::Malformed {
        payload: PayloadType::SA,
        reason,
    }
}

impl SaPayload {
    pub fn parse(body: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(body);
        let mut proposals = Vec::new();
        loop {
            let more = r.u8()?;
            let _reserved = r.u8()?;
            let len = r.u16()? as usize;
            if len < 8 {
                return Err(malformed("proposal length"));
            }
            let mut p = Reader::new(r.take(len - 4)?);
            let number = p.u8()?;
            let protocol = ProtocolId(p.u8()?);
            let spi_size = p.u8()? as usize;
            let count = p.u8()?;
            let spi = p.take(spi_size)?.to_vec();
            let mut transforms = Vec::with_capacity(count as usize);
            for i in 0..count {
                let t_more = p.u8()?;
                let _reserved = p.u8()?;
                let t_len = p.u16()? as usize;
                if t_len < 8 {
                    return Err(malformed("transform length"));
                }
                let mut t = Reader::new(p.take(t_len - 4)?);
                let ty = TransformType(t.u8()?);
                let _reserved = t.u8()?;
                let id = t.u16()?;
                let mut key_length = None;
                let mut has_unknown_attribute = false;
                while !t.is_empty() {
                    let attr = t.u16()?;
                    if attr & ATTR_TV != 0 {
                        let value = t.u16()?;
                        if attr & !ATTR_TV == ATTR_KEY_LENGTH {
                            key_length = Some(value);
                        } else {
                            has_unknown_attribute = true;
                        }
                    } else {
                        let alen = t.u16()? as usize;
                        t.take(alen)?;
                        has_unknown_attribute = true;
                    }
                }
                let is_last = i + 1 == count;
                if (is_last && t_more != LAST) || (!is_last && t_more != MORE_TRANSFORMS) {
                    return Err(malformed("transform last-substructure flag"));
                }
                transforms.push(Transform {
                    ty,
                    id,
                    key_length,
                    has_unknown_attribute,
                });
            }
            if !p.is_empty() {
                return Err(malformed("trailing bytes in proposal"));
            }
            proposals.push(Proposal {
                number,
                protocol,
                spi,
                transforms,
            });
            match more {
                LAST if r.is_empty() => break,
                MORE_PROPOSALS if !r.is_empty() => continue,
                _ => return Err(malformed("proposal last-substructure flag")),
            }
        }
        Ok(Self { proposals })
    }

    pub fn emit(&self, out: &mut Vec<u8>) {
        for (pi, p) in self.proposals.iter().enumerate() {
            let start = out.len();
            out.push(if pi + 1 == self.proposals.len() {
                LAST
            } else {
                MORE_PROPOSALS
            });
            out.push(0);
            out.extend_from_slice(&[0, 0]);
            out.push(p.number);
            out.push(p.protocol.0);
            out.push(p.spi.len() as u8);
            out.push(p.transforms.len() as u8);
            out.extend_from_slice(&p.spi);
            for (ti, t) in p.transforms.iter().enumerate() {
                out.push(if ti + 1 == p.transforms.len() {
                    LAST
                } else {
                    MORE_TRANSFORMS
                });
                out.push(0);
                let len: u16 = if t.key_length.is_some() { 12 } else { 8 };
                out.extend_from_slice(&len.to_be_bytes());
                out.push(t.ty.0);
                out.push(0);
                out.extend_from_slice(&t.id.to_be_bytes());
                if let Some(bits) = t.key_length {
                    out.extend_from_slice(&(ATTR_TV | ATTR_KEY_LENGTH).to_be_bytes());
                    out.extend_from_slice(&bits.to_be_bytes());
                }
            }
            let len = (out.len() - start) as u16;
            out[start + 2..start + 4].copy_from_slice(&len.to_be_bytes());
        }
    }
}
