//! The fixed IKE header, RFC 7296 §3.1.

use super::WireError;
use super::reader::Reader;
use super::types::{ExchangeType, IKE_MAJOR_VERSION, PayloadType, flags};

/// Length of the IKE header, RFC 7296 §3.1.
pub const HEADER_LEN: usize = 28;

/// The IKE header. `length` is filled in by the message builder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub spi_i: u64,
    pub spi_r: u64,
    pub next_payload: PayloadType,
    pub major_version: u8,
    pub minor_version: u8,
    pub exchange: ExchangeType,
    /// Set by the original initiator of the IKE SA on every message it sends.
    pub initiator: bool,
    /// Set on responses.
    pub response: bool,
    pub message_id: u32,
    pub length: u32,
}

impl Header {
    /// Parses the header and checks that the length field covers exactly `buf`.
    pub fn parse(buf: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(buf);
        let spi_i = r.u64()?;
        let spi_r = r.u64()?;
        let next_payload = PayloadType(r.u8()?);
        let version = r.u8()?;
        let exchange = ExchangeType(r.u8()?);
        let flag_bits = r.u8()?;
        let message_id = r.u32()?;
        let length = r.u32()?;
        let major_version = version >> 4;
        if major_version != IKE_MAJOR_VERSION {
            // §2.5: a major version we do not speak is refused before anything else.
            return Err(WireError::UnsupportedVersion(major_version));
        }
        if length as usize != buf.len() {
            return Err(WireError::BadLength);
        }
        Ok(Self {
            spi_i,
            spi_r,
            next_payload,
            major_version,
            minor_version: version & 0x0f,
            exchange,
            initiator: flag_bits & flags::INITIATOR != 0,
            response: flag_bits & flags::RESPONSE != 0,
            message_id,
            length,
        })
    }

    /// Reads only the SPIs and flags, without checking length or version; for routing.
    pub fn peek(buf: &[u8]) -> Option<Self> {
        if buf.len() < HEADER_LEN {
            return None;
        }
        let mut r = Reader::new(buf);
        let spi_i = r.u64().ok()?;
        let spi_r = r.u64().ok()?;
        let next_payload = PayloadType(r.u8().ok()?);
        let version = r.u8().ok()?;
        let exchange = ExchangeType(r.u8().ok()?);
        let flag_bits = r.u8().ok()?;
        let message_id = r.u32().ok()?;
        let length = r.u32().ok()?;
        Some(Self {
            spi_i,
            spi_r,
            next_payload,
            major_version: version >> 4,
            minor_version: version & 0x0f,
            exchange,
            initiator: flag_bits & flags::INITIATOR != 0,
            response: flag_bits & flags::RESPONSE != 0,
            message_id,
            length,
        })
    }

    pub fn emit(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.spi_i.to_be_bytes());
        out.extend_from_slice(&self.spi_r.to_be_bytes());
        out.push(self.next_payload.0);
        out.push((self.major_version << 4) | (self.minor_version & 0x0f));
        out.push(self.exchange.0);
        let mut f = 0;
        if self.initiator {
            f |= flags::INITIATOR;
        }
        if self.response {
            f |= flags::RESPONSE;
        }
        out.push(f);
        out.extend_from_slice(&self.message_id.to_be_bytes());
        out.extend_from_slice(&self.length.to_be_bytes());
    }
}
