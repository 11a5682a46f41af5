//! Key derivation: SKEYSEED and the IKE SA keys (RFC 7296 §2.14), the rekeyed
//! IKE SA (§2.18) and child SA KEYMAT (§2.17).

use serde::{Deserialize, Serialize};

use super::prf::{prf, prf_plus};
use super::secret::Secret;
use super::suite::{EncrAlg, IkeSuite, PrfAlg};

/// The seven IKE SA keys. For AEAD ciphers SK_ai/SK_ar are empty (§2.14:
/// integrity keys are omitted when the cipher has no separate integrity).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IkeKeys {
    pub sk_d: Secret,
    pub sk_ai: Secret,
    pub sk_ar: Secret,
    pub sk_ei: Secret,
    pub sk_er: Secret,
    pub sk_pi: Secret,
    pub sk_pr: Secret,
}

impl IkeKeys {
    fn split(suite: &IkeSuite, keymat: &Secret) -> Self {
        let prf_len = suite.prf.output_len();
        let integ_len = 0;
        let encr_len = suite.encr.keymat_len();
        let k = keymat.expose();
        let mut at = 0;
        let mut take = |n: usize| {
            let s = Secret::from_slice(&k[at..at + n]);
            at += n;
            s
        };
        Self {
            sk_d: take(prf_len),
            sk_ai: take(integ_len),
            sk_ar: take(integ_len),
            sk_ei: take(encr_len),
            sk_er: take(encr_len),
            sk_pi: take(prf_len),
            sk_pr: take(prf_len),
        }
    }

    fn total_len(suite: &IkeSuite) -> usize {
        3 * suite.prf.output_len() + 2 * suite.encr.keymat_len()
    }

    /// Initial IKE SA: SKEYSEED = prf(Ni | Nr, g^ir), then
    /// prf+(SKEYSEED, Ni | Nr | SPIi | SPIr).
    pub fn derive_initial(
        suite: &IkeSuite,
        shared: &Secret,
        ni: &[u8],
        nr: &[u8],
        spi_i: u64,
        spi_r: u64,
    ) -> Self {
        let mut nonces = Vec::with_capacity(ni.len() + nr.len());
        nonces.extend_from_slice(ni);
        nonces.extend_from_slice(nr);
        let skeyseed = Secret::new(prf(suite.prf, &nonces, &[shared.expose()]));
        Self::expand(suite, &skeyseed, ni, nr, spi_i, spi_r)
    }

    /// Rekeyed IKE SA (§2.18): SKEYSEED = prf(SK_d (old), g^ir (new) | Ni | Nr)
    /// with the old SA's PRF; the new SA's PRF then expands it.
    #[allow(clippy::too_many_arguments)]
    pub fn derive_rekeyed(
        old_prf: PrfAlg,
        old_sk_d: &Secret,
        suite: &IkeSuite,
        shared: &Secret,
        ni: &[u8],
        nr: &[u8],
        spi_i: u64,
        spi_r: u64,
    ) -> Self {
        let skeyseed = Secret::new(prf(old_prf, old_sk_d.expose(), &[shared.expose(), ni, nr]));
        Self::expand(suite, &skeyseed, ni, nr, spi_i, spi_r)
    }

    fn expand(
        suite: &IkeSuite,
        skeyseed: &Secret,
        ni: &[u8],
        nr: &[u8],
        spi_i: u64,
        spi_r: u64,
    ) -> Self {
        let mut seed = Vec::with_capacity(ni.len() + nr.len() + 16);
        seed.extend_from_slice(ni);
        seed.extend_from_slice(nr);
        seed.extend_from_slice(&spi_i.to_be_bytes());
        seed.extend_from_slice(&spi_r.to_be_bytes());
        let keymat = prf_plus(suite.prf, skeyseed.expose(), &seed, Self::total_len(suite));
        Self::split(suite, &keymat)
    }
}

/// Keys of one child SA, in both directions, named from the point of view of
/// the exchange that created it: `initiator_to_responder` is taken first
/// (§2.17). Each is the AES key followed by the 4-octet salt (RFC 4106 §8.1).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChildKeymat {
    pub initiator_to_responder: Secret,
    pub responder_to_initiator: Secret,
}

impl ChildKeymat {
    /// KEYMAT = prf+(SK_d, [g^ir (new) |] Ni | Nr).
    pub fn derive(
        prf_alg: PrfAlg,
        sk_d: &Secret,
        encr: EncrAlg,
        pfs: Option<&Secret>,
        ni: &[u8],
        nr: &[u8],
    ) -> Self {
        let mut seed = Vec::new();
        if let Some(g) = pfs {
            seed.extend_from_slice(g.expose());
        }
        seed.extend_from_slice(ni);
        seed.extend_from_slice(nr);
        let n = encr.keymat_len();
        let keymat = prf_plus(prf_alg, sk_d.expose(), &seed, 2 * n);
        zeroize::Zeroize::zeroize(&mut seed);
        let k = keymat.expose();
        Self {
            initiator_to_responder: Secret::from_slice(&k[..n]),
            responder_to_initiator: Secret::from_slice(&k[n..]),
        }
    }
}

/// The key pad of the shared-secret AUTH computation, RFC 7296 §2.15.
const KEY_PAD: &[u8] = b"Key Pad for IKEv2";

/// `AUTH = prf(prf(Shared Secret, "Key Pad for IKEv2"), SignedOctets)`, where
/// SignedOctets = RealMessage | NonceData | prf(SK_p, RestOfIDPayload) (§2.15).
pub fn psk_auth(
    prf_alg: PrfAlg,
    psk: &Secret,
    real_message: &[u8],
    peer_nonce: &[u8],
    sk_p: &Secret,
    id_body: &[u8],
) -> Vec<u8> {
    let maced_id = prf(prf_alg, sk_p.expose(), &[id_body]);
    let key = Secret::new(prf(prf_alg, psk.expose(), &[KEY_PAD]));
    prf(
        prf_alg,
        key.expose(),
        &[real_message, peer_nonce, &maced_id],
    )
}

/// NAT_DETECTION_*_IP data: SHA-1(SPIi | SPIr | IP | port), RFC 7296 §2.23.
pub fn nat_detection_hash(spi_i: u64, spi_r: u64, addr: std::net::SocketAddr) -> Vec<u8> {
    use sha1::Digest;
    let mut h = sha1::Sha1::new();
    h.update(spi_i.to_be_bytes());
    h.update(spi_r.to_be_bytes());
    match addr.ip() {
        std::net::IpAddr::V4(a) => h.update(a.octets()),
        std::net::IpAddr::V6(a) => h.update(a.octets()),
    }
    h.update(addr.port().to_be_bytes());
    h.finalize().to_vec()
}

/// The cookie of RFC 7296 §2.6: version | prf(secret, Ni | IPi | SPIi).
pub fn cookie(
    version: u8,
    secret: &Secret,
    ni: &[u8],
    peer: std::net::IpAddr,
    spi_i: u64,
) -> Vec<u8> {
    let ip = match peer {
        std::net::IpAddr::V4(a) => a.octets().to_vec(),
        std::net::IpAddr::V6(a) => a.octets().to_vec(),
    };
    let mut out = vec![version];
    out.extend_from_slice(&prf(
        PrfAlg::HmacSha256,
        secret.expose(),
        &[ni, &ip, &spi_i.to_be_bytes()],
    ));
    out
}
