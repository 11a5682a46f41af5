//! The small fixed-layout payloads: KE (§3.4), Identification (§3.5), AUTH (§3.8),
//! Notify (§3.10) and Delete (§3.11).

use serde::{Deserialize, Serialize};

use super::WireError;
use super::reader::Reader;
use super::types::{AuthMethod, IdType, NotifyType, PayloadType, ProtocolId};

/// Key Exchange payload, RFC 7296 §3.4.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KePayload {
    pub group: u16,
    pub data: Vec<u8>,
}

impl KePayload {
    pub fn parse(body: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(body);
        let group = r.u16()?;
        r.u16()?;
        Ok(Self {
            group,
            data: r.rest().to_vec(),
        })
    }

    pub fn emit(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.group.to_be_bytes());
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&self.data);
    }
}

/// An IKE identity (the body of an IDi/IDr payload, RFC 7296 §3.5).
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Identity {
    pub kind: IdType,
    pub data: Vec<u8>,
}

impl Identity {
    pub fn fqdn(name: &str) -> Self {
        Self {
            kind: IdType::FQDN,
            data: name.as_bytes().to_vec(),
        }
    }

    pub fn email(addr: &str) -> Self {
        Self {
            kind: IdType::RFC822_ADDR,
            data: addr.as_bytes().to_vec(),
        }
    }

    pub fn ipv4(addr: std::net::Ipv4Addr) -> Self {
        Self {
            kind: IdType::IPV4_ADDR,
            data: addr.octets().to_vec(),
        }
    }

    /// An identity as strongSwan and evpc's configuration files write it: an IPv4 address,
    /// `@fqdn` (the `@` forces FQDN), `user@domain`, or otherwise an FQDN.
    pub fn from_config(text: &str) -> Self {
        if let Ok(ip) = text.parse::<std::net::Ipv4Addr>() {
            Self::ipv4(ip)
        } else if let Some(fqdn) = text.strip_prefix('@') {
            Self::fqdn(fqdn)
        } else if text.contains('@') {
            Self::email(text)
        } else {
            Self::fqdn(text)
        }
    }

    pub fn key_id(id: &[u8]) -> Self {
        Self {
            kind: IdType::KEY_ID,
            data: id.to_vec(),
        }
    }

    pub fn parse(body: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(body);
        let kind = IdType(r.u8()?);
        r.take(3)?;
        Ok(Self {
            kind,
            data: r.rest().to_vec(),
        })
    }

    /// The payload body: ID type, three reserved octets, data. This is also
    /// `RestOfInitIDPayload` / `RestOfRespIDPayload` of §2.15.
    pub fn emit(&self, out: &mut Vec<u8>) {
        out.push(self.kind.0);
        out.extend_from_slice(&[0, 0, 0]);
        out.extend_from_slice(&self.data);
    }

    pub fn to_body(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(4 + self.data.len());
        self.emit(&mut v);
        v
    }
}

impl core::fmt::Debug for Identity {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{self}")
    }
}

impl core::fmt::Display for Identity {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.kind {
            IdType::FQDN | IdType::RFC822_ADDR => {
                write!(f, "{}", String::from_utf8_lossy(&self.data))
            }
            IdType::IPV4_ADDR if self.data.len() == 4 => {
                let a: [u8; 4] = [self.data[0], self.data[1], self.data[2], self.data[3]];
                write!(f, "{}", std::net::Ipv4Addr::from(a))
            }
            kind => {
                write!(f, "{kind}:")?;
                for b in &self.data {
                    write!(f, "{b:02x}")?;
                }
                Ok(())
            }
        }
    }
}

/// Authentication payload, RFC 7296 §3.8.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthPayload {
    pub method: AuthMethod,
    pub data: Vec<u8>,
}

impl AuthPayload {
    pub fn parse(body: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(body);
        let method = AuthMethod(r.u8()?);
        r.take(3)?;
        Ok(Self {
            method,
            data: r.rest().to_vec(),
        })
    }

    pub fn emit(&self, out: &mut Vec<u8>) {
        out.push(self.method.0);
        out.extend_from_slice(&[0, 0, 0]);
        out.extend_from_slice(&self.data);
    }
}

/// Notify payload, RFC 7296 §3.10.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NotifyPayload {
    pub protocol: ProtocolId,
    pub spi: Vec<u8>,
    pub ty: NotifyType,
    pub data: Vec<u8>,
}

impl NotifyPayload {
    pub fn new(ty: NotifyType, data: Vec<u8>) -> Self {
        Self {
            protocol: ProtocolId::NONE,
            spi: Vec::new(),
            ty,
            data,
        }
    }

    pub fn parse(body: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(body);
        let protocol = ProtocolId(r.u8()?);
        let spi_size = r.u8()? as usize;
        let ty = NotifyType(r.u16()?);
        let spi = r.take(spi_size)?.to_vec();
        Ok(Self {
            protocol,
            spi,
            ty,
            data: r.rest().to_vec(),
        })
    }

    pub fn emit(&self, out: &mut Vec<u8>) {
        out.push(self.protocol.0);
        out.push(self.spi.len() as u8);
        out.extend_from_slice(&self.ty.0.to_be_bytes());
        out.extend_from_slice(&self.spi);
        out.extend_from_slice(&self.data);
    }
}

/// Delete payload, RFC 7296 §3.11. For IKE the SPI list is empty (the SA is the
/// one the message travels on); for ESP/AH every SPI is four octets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeletePayload {
    pub protocol: ProtocolId,
    pub spis: Vec<u32>,
}

impl DeletePayload {
    pub fn parse(body: &[u8]) -> Result<Self, WireError> {
        let malformed = |reason| WireError::Malformed {
            payload: PayloadType::DELETE,
            reason,
        };
        let mut r = Reader::new(body);
        let protocol = ProtocolId(r.u8()?);
        let spi_size = r.u8()?;
        let count = r.u16()?;
        let mut spis = Vec::new();
        match (protocol, spi_size) {
            (ProtocolId::IKE, 0) => {
                if count != 0 {
                    return Err(malformed("IKE delete carries SPIs"));
                }
            }
            (ProtocolId::ESP | ProtocolId::AH, 4) => {
                for _ in 0..count {
                    spis.push(r.u32()?);
                }
            }
            _ => return Err(malformed("protocol/SPI size")),
        }
        if !r.is_empty() {
            return Err(malformed("trailing bytes"));
        }
        Ok(Self { protocol, spis })
    }

    pub fn emit(&self, out: &mut Vec<u8>) {
        out.push(self.protocol.0);
        out.push(if self.protocol == ProtocolId::IKE {
            0
        } else {
            4
        });
        out.extend_from_slice(&(self.spis.len() as u16).to_be_bytes());
        for spi in &self.spis {
            out.extend_from_slice(&spi.to_be_bytes());
        }
    }
}
