//! admin.v1 request decoding: any bytes, as any request, never panic; an imported SA context's
//! record (what `sa import` decodes after unsealing) too.
#![no_main]

use evpc_proto::admin::v1 as pb;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Some((&kind, body)) = data.split_first() else {
        return;
    };
    match kind % 16 {
        0 => drop(pb::StatusRequest::decode(body)),
        1 => drop(pb::InitializeRequest::decode(body)),
        2 => drop(pb::AddMemberRequest::decode(body)),
        3 => drop(pb::RemoveMemberRequest::decode(body)),
        4 => drop(pb::TransferLeaderRequest::decode(body)),
        5 => drop(pb::ListSlotsRequest::decode(body)),
        6 => drop(pb::TransferSaRequest::decode(body)),
        7 => drop(pb::NodeRequest::decode(body)),
        8 => drop(pb::RebalanceRequest::decode(body)),
        9 => drop(pb::ListSasRequest::decode(body)),
        10 => drop(pb::GetSaRequest::decode(body)),
        11 => drop(pb::DeleteSaRequest::decode(body)),
        12 => drop(pb::ExportSaRequest::decode(body)),
        13 => drop(pb::ImportSaRequest::decode(body)),
        _ => {
            if let Ok(context) = postcard::from_bytes::<evpc_raft_store::SaContext>(body) {
                let _ = context.importable();
            }
        }
    }
});
