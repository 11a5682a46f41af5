//! Known-answer tests. The IKE SA and child SA values were captured from an
//! unmodified strongSwan 5.9.8 initiator (charon log level 4) talking to this
//! engine's responder: aes128gcm16-prfsha256-x25519, PSK "s3cret-psk-value",
//! IDs client.example / gw.example. The IKE_SA_INIT messages come from the
//! AUTH "octets" strongSwan logged, so our parser also reads its bytes.

use evpc_ike::Identity;
use evpc_ike::crypto::keys::{ChildKeymat, IkeKeys, psk_auth};
use evpc_ike::crypto::prf::{prf, prf_plus};
use evpc_ike::crypto::{DhGroup, EncrAlg, IkeSuite, PrfAlg, Secret};
use evpc_ike::wire::{self, Payload};

const G_IR: &str = "3375e01b4a17495544f406a9b529dc5628efab8dd3a574648dbbdb435670351c";
const SKEYSEED: &str = "754a2e872d082a9aaa5b43d53d78c97b17b465091289e48b057f9dee1e7c15d3";
const SK_D: &str = "d66d77fcc8ecac92c68ea3d333f189cb395142e99a53aeae5f124f88ba9d6635";
const SK_EI: &str = "b1b451e8881bb4046db16abae436c864150c87c7";
const SK_ER: &str = "60bd63bd719a31320471de6cab9bc935b2631736";
const SK_PI: &str = "b120486d70d13229c07622052a97ca6b01fc6f78bc49c6698a274bb212bca23c";
const SK_PR: &str = "6128f65471a21251f359d8820b147f23c399599e9d2ea4e46b3d7eaad30d765b";
const INITIATOR_OCTETS: &str = "975df204b94a28f600000000000000002120220800000000000000e82200002800000024010100030300000c01000014800e00800300000802000005000000080400001f28000028001f0000c85439a0d03bc4c57009b3f6827157e5aea2dbaee421730c54bdaaeac19c916029000024c94fa4b8d513d156daea02d3f58b0f4884b74f9deb86f0f209acdaf48b22644f2900001c000040048387a691b3edcf2df5013716e39d514a216ae0b82900001c000040054f5b1edd03442ae5b26133139d9a856592489d7a290000080000402e290000100000402f00020003000400050000000800004016d24c22806ed9597e72d6c80390841fed1eabab4e1a2a8ec063eb8f73bcf230b84d5f1bb231ae724bb27e0d16ef4e8fed629a6c07f21cc9e997befa31dc407358";
const PSK_KEYPAD: &str = "6d1bd808de84f68f39a95777c873e516891c5034867d0aa470e840a1677e2153";
const INITIATOR_AUTH: &str = "3afa819b1bf654c76eb3d8c70167bd289b649be00ee02ac1a98a16189c60116d";
const RESPONDER_OCTETS: &str = "975df204b94a28f69030fd9cef58d2fe2120222000000000000000c82200002800000024010100030300000c01000014800e00800300000802000005000000080400001f28000028001f000074d9e8e2509ee2f259a0543534803f9519a36d9afa14448411b19a5d428c664b29000024d24c22806ed9597e72d6c80390841fed1eabab4e1a2a8ec063eb8f73bcf230b82900001c00004004e73006c605f357c4dcbca36c3d6ad1f244bab8d20000001c000040050156b2fdb21623d7e72952d8342857a50470c6a7c94fa4b8d513d156daea02d3f58b0f4884b74f9deb86f0f209acdaf48b22644fcc764cecc04cd5e6c57439b1a186205bd665f8654f725cdc28cb5d20daf8c604";
const RESPONDER_AUTH: &str = "7eb02d16888f1361743fa3c27fa58330a7d925279a5c09c8a4d0c5b4cef3cd7b";
const CHILD_I2R: &str = "1b72df4a6d4c03942fac128e4d0b80eb80a7e84b";
const CHILD_R2I: &str = "dd7c4caea0d8b1ef110966f46b9061fd6a332a2c";

fn h(s: &str) -> Vec<u8> {
    hex::decode(s).expect("hex")
}

struct Init {
    message: Vec<u8>,
    spi_i: u64,
    spi_r: u64,
    nonce: Vec<u8>,
}

/// Splits logged AUTH octets into (IKE_SA_INIT message, nonce, maced ID).
fn split_octets(octets: &[u8]) -> (Init, Vec<u8>, Vec<u8>) {
    let len = u32::from_be_bytes(octets[24..28].try_into().unwrap()) as usize;
    let message = octets[..len].to_vec();
    let (header, chain) = wire::parse_message(&message).expect("strongSwan's IKE_SA_INIT parses");
    let nonce = chain
        .payloads
        .iter()
        .find_map(|p| {
            if let Payload::Nonce(n) = p {
                Some(n.clone())
            } else {
                None
            }
        })
        .expect("nonce payload");
    let rest = &octets[len..];
    let init = Init {
        message,
        spi_i: header.spi_i,
        spi_r: header.spi_r,
        nonce,
    };
    (init, rest[..32].to_vec(), rest[32..].to_vec())
}

const SUITE: IkeSuite = IkeSuite {
    encr: EncrAlg::AES128_GCM16,
    prf: PrfAlg::HmacSha256,
    dh: DhGroup::Curve25519,
};

#[test]
fn ike_sa_keys_match_strongswan() {
    let (req, nr, _) = split_octets(&h(INITIATOR_OCTETS));
    let (resp, ni, _) = split_octets(&h(RESPONDER_OCTETS));
    assert_eq!(req.nonce, ni, "the responder signs the initiator's nonce");
    assert_eq!(resp.nonce, nr);
    assert_eq!(req.spi_r, 0);
    assert_eq!(req.spi_i, resp.spi_i);
    let g_ir = Secret::new(h(G_IR));
    // SKEYSEED = prf(Ni | Nr, g^ir)
    let mut nonces = ni.clone();
    nonces.extend_from_slice(&nr);
    assert_eq!(
        prf(PrfAlg::HmacSha256, &nonces, &[g_ir.expose()]),
        h(SKEYSEED)
    );
    let keys = IkeKeys::derive_initial(&SUITE, &g_ir, &ni, &nr, resp.spi_i, resp.spi_r);
    assert_eq!(keys.sk_d.expose(), h(SK_D));
    assert_eq!(keys.sk_ei.expose(), h(SK_EI));
    assert_eq!(keys.sk_er.expose(), h(SK_ER));
    assert_eq!(keys.sk_pi.expose(), h(SK_PI));
    assert_eq!(keys.sk_pr.expose(), h(SK_PR));
    assert!(
        keys.sk_ai.is_empty() && keys.sk_ar.is_empty(),
        "no SK_a with an AEAD"
    );
}

#[test]
fn psk_auth_matches_strongswan_both_directions() {
    let psk = Secret::from_slice(b"s3cret-psk-value");
    assert_eq!(
        prf(PrfAlg::HmacSha256, psk.expose(), &[b"Key Pad for IKEv2"]),
        h(PSK_KEYPAD)
    );
    let (req, nr, maced_i) = split_octets(&h(INITIATOR_OCTETS));
    let (resp, ni, maced_r) = split_octets(&h(RESPONDER_OCTETS));
    let id_i = Identity::fqdn("client.example").to_body();
    let id_r = Identity::fqdn("gw.example").to_body();
    let sk_pi = Secret::new(h(SK_PI));
    let sk_pr = Secret::new(h(SK_PR));
    assert_eq!(prf(PrfAlg::HmacSha256, sk_pi.expose(), &[&id_i]), maced_i);
    assert_eq!(prf(PrfAlg::HmacSha256, sk_pr.expose(), &[&id_r]), maced_r);
    assert_eq!(
        psk_auth(PrfAlg::HmacSha256, &psk, &req.message, &nr, &sk_pi, &id_i),
        h(INITIATOR_AUTH)
    );
    assert_eq!(
        psk_auth(PrfAlg::HmacSha256, &psk, &resp.message, &ni, &sk_pr, &id_r),
        h(RESPONDER_AUTH)
    );
}

#[test]
fn child_keymat_matches_strongswan() {
    let (_, nr, _) = split_octets(&h(INITIATOR_OCTETS));
    let (_, ni, _) = split_octets(&h(RESPONDER_OCTETS));
    let km = ChildKeymat::derive(
        PrfAlg::HmacSha256,
        &Secret::new(h(SK_D)),
        EncrAlg::AES128_GCM16,
        None,
        &ni,
        &nr,
    );
    assert_eq!(km.initiator_to_responder.expose(), h(CHILD_I2R));
    assert_eq!(km.responder_to_initiator.expose(), h(CHILD_R2I));
}

/// RFC 4231 test case 2 for the three PRFs.
#[test]
fn hmac_sha2_rfc4231_case_2() {
    let key = b"Jefe";
    let data: &[u8] = b"what do ya want for nothing?";
    assert_eq!(
        prf(PrfAlg::HmacSha256, key, &[data]),
        h("5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843")
    );
    assert_eq!(
        prf(PrfAlg::HmacSha384, key, &[data]),
        h(
            "af45d2e376484031617f78d2b58a6b1b9c7ef464f5a01b47e42ec3736322445e8e2240ca5e69e2c78b3239ecfab21649"
        )
    );
    assert_eq!(
        prf(PrfAlg::HmacSha512, key, &[data]),
        h(
            "164b7a7bfcf819e2e395fbe73b56e0a387bd64222e831fd610270cd7ea2505549758bf75c05a994a6d034f65f8f0e6fdcaeab1a34d4a6b4b636e070a38bce737"
        )
    );
}

/// prf+ is T1 | T2 | ... with Tn = prf(K, Tn-1 | S | n) (RFC 7296 §2.13).
#[test]
fn prf_plus_chains_blocks_and_truncates() {
    let k = b"key";
    let s = b"seed";
    let t1 = prf(PrfAlg::HmacSha256, k, &[s, &[1]]);
    let t2 = prf(PrfAlg::HmacSha256, k, &[&t1, s, &[2]]);
    let t3 = prf(PrfAlg::HmacSha256, k, &[&t2, s, &[3]]);
    let expected = [t1, t2, t3].concat();
    assert_eq!(
        prf_plus(PrfAlg::HmacSha256, k, s, 70).expose(),
        &expected[..70]
    );
}

/// Both halves of every group agree, and degenerate public values are refused.
#[test]
fn key_exchange_groups_agree_and_refuse_bad_values() {
    use evpc_ike::crypto::{DhError, DhPrivate};
    let mut counter = 0u8;
    let mut rng = |b: &mut [u8]| {
        for x in b.iter_mut() {
            counter = counter.wrapping_mul(31).wrapping_add(7);
            *x = counter;
        }
    };
    for group in [DhGroup::Curve25519, DhGroup::Ecp256, DhGroup::Modp2048] {
        let a = DhPrivate::generate(group, &mut rng);
        let b = DhPrivate::generate(group, &mut rng);
        assert_eq!(a.public().len(), group.public_len());
        let ab = a.agree(&b.public()).unwrap();
        let ba = b.agree(&a.public()).unwrap();
        assert_eq!(ab, ba, "{group:?}");
        assert!(a.agree(&[0u8; 3]).is_err(), "wrong length for {group:?}");
    }
    let m = DhPrivate::generate(DhGroup::Modp2048, &mut rng);
    let mut one = vec![0u8; 256];
    one[255] = 1;
    assert_eq!(m.agree(&one), Err(DhError::OutOfRange));
    assert_eq!(m.agree(&[0xff; 256]), Err(DhError::OutOfRange));
    // g = 2 is a legitimate public value (that of exponent 1).
    let mut two = vec![0u8; 256];
    two[255] = 2;
    assert!(m.agree(&two).is_ok());
    let p = DhPrivate::generate(DhGroup::Ecp256, &mut rng);
    assert_eq!(p.agree(&[0u8; 64]), Err(DhError::InvalidPoint));
    let x = DhPrivate::generate(DhGroup::Curve25519, &mut rng);
    assert_eq!(x.agree(&[0u8; 32]), Err(DhError::NonContributory));
}
