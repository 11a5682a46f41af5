//! cluster.v1 request decoding: any bytes, as any request, never panic; a command that decodes
//! is applied to a state, which must refuse it or keep its invariants, never panic.
#![no_main]

use evpc_proto::cluster::v1 as pb;
use evpc_raft_store::raft::{SnapshotMeta, Vote};
use evpc_raft_store::{Command, State, TypeConfig};
use libfuzzer_sys::fuzz_target;
use openraft::raft::{AppendEntriesRequest, TransferLeaderRequest, VoteRequest};
use prost::Message;

fn payload<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Option<T> {
    postcard::from_bytes(bytes).ok()
}

fuzz_target!(|data: &[u8]| {
    let Some((&kind, body)) = data.split_first() else {
        return;
    };
    match kind % 8 {
        0 => {
            if let Ok(m) = pb::RaftMessage::decode(body) {
                let _ = payload::<AppendEntriesRequest<TypeConfig>>(&m.payload);
            }
        }
        1 => {
            if let Ok(m) = pb::RaftMessage::decode(body) {
                let _ = payload::<VoteRequest<TypeConfig>>(&m.payload);
                let _ = payload::<TransferLeaderRequest<TypeConfig>>(&m.payload);
            }
        }
        2 => {
            if let Ok(m) = pb::SnapshotChunk::decode(body) {
                let _ = payload::<(Vote, SnapshotMeta)>(&m.header);
            }
        }
        3 => {
            if let Ok(m) = pb::Proposal::decode(body)
                && let Some(command) = payload::<Command>(&m.command)
            {
                let mut state = State::default();
                let _ = evpc_raft_store::apply(&mut state, &command);
            }
        }
        4 => {
            let _ = pb::PingMessage::decode(body);
        }
        5 => {
            let _ = pb::ReadIndexRequest::decode(body);
        }
        6 => {
            let _ = pb::CheckInRequest::decode(body);
        }
        _ => {
            // A bare postcard command, as it sits in a log entry.
            if let Some(command) = payload::<Command>(body) {
                let mut state = State::default();
                let _ = evpc_raft_store::apply(&mut state, &command);
            }
        }
    }
});
