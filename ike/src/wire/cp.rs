//! Configuration payload, RFC 7296 §3.15.

use super::WireError;
use super::reader::Reader;
use super::types::{CfgAttributeType, CfgType};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpPayload {
    pub cfg_type: CfgType,
    pub attributes: Vec<CpAttribute>,
}

/// One attribute; a request usually carries an empty value ("give me one").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpAttribute {
    pub ty: CfgAttributeType,
    pub value: Vec<u8>,
}

impl CpPayload {
    pub fn parse(body: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(body);
        let cfg_type = CfgType(r.u8()?);
        r.take(3)?;
        let mut attributes = Vec::new();
        while !r.is_empty() {
            // The top bit is reserved (§3.15.1) and ignored on receipt.
            let ty = CfgAttributeType(r.u16()? & 0x7fff);
            let len = r.u16()? as usize;
            attributes.push(CpAttribute {
                ty,
                value: r.take(len)?.to_vec(),
            });
        }
        Ok(Self {
            cfg_type,
            attributes,
        })
    }

    pub fn emit(&self, out: &mut Vec<u8>) {
        out.push(self.cfg_type.0);
        out.extend_from_slice(&[0, 0, 0]);
        for a in &self.attributes {
            out.extend_from_slice(&(a.ty.0 & 0x7fff).to_be_bytes());
            out.extend_from_slice(&(a.value.len() as u16).to_be_bytes());
            out.extend_from_slice(&a.value);
        }
    }

    pub fn has(&self, ty: CfgAttributeType) -> bool {
        self.attributes.iter().any(|a| a.ty == ty)
    }
}
