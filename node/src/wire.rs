//! postcard encoding of the Raft and proposal payloads inside cluster.v1 envelopes.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// A payload that would not encode or decode.
#[derive(Debug, thiserror::Error)]
#[error("cluster.v1 payload: {0}")]
pub struct WireError(#[from] postcard::Error);

/// Encodes a payload.
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, WireError> {
    Ok(postcard::to_stdvec(value)?)
}

/// Decodes a payload from untrusted bytes.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, WireError> {
    Ok(postcard::from_bytes(bytes)?)
}

impl From<WireError> for tonic::Status {
    fn from(e: WireError) -> Self {
        tonic::Status::invalid_argument(e.to_string())
    }
}
