//! Registry values used on the wire. Each is an open newtype so that values we
//! do not know survive a parse and can be reported (or refused) by the caller.

use serde::{Deserialize, Serialize};

macro_rules! open_enum {
    ($(#[$meta:meta])* $name:ident($repr:ty) { $($(#[$vmeta:meta])* $variant:ident = $value:expr,)* }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        pub struct $name(pub $repr);

        impl $name {
            $($(#[$vmeta])* pub const $variant: Self = Self($value);)*

            /// The registry name, if this value is one we know.
            pub fn name(self) -> Option<&'static str> {
                match self.0 {
                    $($value => Some(stringify!($variant)),)*
                    _ => None,
                }
            }
        }

        impl core::fmt::Debug for $name {
            fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                match self.name() {
                    Some(name) => f.write_str(name),
                    None => write!(f, "{}({})", stringify!($name), self.0),
                }
            }
        }

        impl core::fmt::Display for $name {
            fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                core::fmt::Debug::fmt(self, f)
            }
        }
    };
}

open_enum! {
    /// Exchange types, RFC 7296 §3.1.
    ExchangeType(u8) {
        IKE_SA_INIT = 34,
        IKE_AUTH = 35,
        CREATE_CHILD_SA = 36,
        INFORMATIONAL = 37,
    }
}

open_enum! {
    /// Payload types, RFC 7296 §3.2 (SKF: RFC 7383 §2.5).
    PayloadType(u8) {
        NONE = 0,
        SA = 33,
        KE = 34,
        IDI = 35,
        IDR = 36,
        CERT = 37,
        CERTREQ = 38,
        AUTH = 39,
        NONCE = 40,
        NOTIFY = 41,
        DELETE = 42,
        VENDOR_ID = 43,
        TSI = 44,
        TSR = 45,
        SK = 46,
        CP = 47,
        EAP = 48,
        SKF = 53,
    }
}

open_enum! {
    /// Security protocol identifiers, RFC 7296 §3.3.1.
    ProtocolId(u8) {
        NONE = 0,
        IKE = 1,
        AH = 2,
        ESP = 3,
    }
}

open_enum! {
    /// Transform types, RFC 7296 §3.3.2.
    TransformType(u8) {
        ENCR = 1,
        PRF = 2,
        INTEG = 3,
        DH = 4,
        ESN = 5,
    }
}

open_enum! {
    /// Notify message types, RFC 7296 §3.10.1 (error types below 16384, status
    /// types above), plus the status types from other RFCs that strongSwan sends.
    NotifyType(u16) {
        UNSUPPORTED_CRITICAL_PAYLOAD = 1,
        INVALID_IKE_SPI = 4,
        INVALID_MAJOR_VERSION = 5,
        INVALID_SYNTAX = 7,
        INVALID_MESSAGE_ID = 9,
        INVALID_SPI = 11,
        NO_PROPOSAL_CHOSEN = 14,
        INVALID_KE_PAYLOAD = 17,
        AUTHENTICATION_FAILED = 24,
        SINGLE_PAIR_REQUIRED = 34,
        NO_ADDITIONAL_SAS = 35,
        INTERNAL_ADDRESS_FAILURE = 36,
        FAILED_CP_REQUIRED = 37,
        TS_UNACCEPTABLE = 38,
        INVALID_SELECTORS = 39,
        TEMPORARY_FAILURE = 43,
        CHILD_SA_NOT_FOUND = 44,
        INITIAL_CONTACT = 16384,
        SET_WINDOW_SIZE = 16385,
        ADDITIONAL_TS_POSSIBLE = 16386,
        IPCOMP_SUPPORTED = 16387,
        NAT_DETECTION_SOURCE_IP = 16388,
        NAT_DETECTION_DESTINATION_IP = 16389,
        COOKIE = 16390,
        USE_TRANSPORT_MODE = 16391,
        HTTP_CERT_LOOKUP_SUPPORTED = 16392,
        REKEY_SA = 16393,
        ESP_TFC_PADDING_NOT_SUPPORTED = 16394,
        NON_FIRST_FRAGMENTS_ALSO = 16395,
        /// RFC 4555 §4.2.1
        MOBIKE_SUPPORTED = 16396,
        /// RFC 4555 §4.2.2
        ADDITIONAL_IP4_ADDRESS = 16397,
        /// RFC 4555 §4.2.2
        NO_ADDITIONAL_ADDRESSES = 16399,
        /// RFC 5685 §5
        REDIRECT_SUPPORTED = 16406,
        /// RFC 4739 §3.1
        MULTIPLE_AUTH_SUPPORTED = 16404,
        /// RFC 5998 §3
        EAP_ONLY_AUTHENTICATION = 16417,
        /// RFC 6311 §4.1
        IKEV2_MESSAGE_ID_SYNC_SUPPORTED = 16420,
        /// RFC 7383 §2.3
        IKEV2_FRAGMENTATION_SUPPORTED = 16430,
        /// RFC 7427 §4
        SIGNATURE_HASH_ALGORITHMS = 16431,
    }
}

impl NotifyType {
    /// Error notifications are the types below 16384 (RFC 7296 §3.10.1).
    pub fn is_error(self) -> bool {
        self.0 < 16384
    }
}

open_enum! {
    /// Identification types, RFC 7296 §3.5.
    IdType(u8) {
        IPV4_ADDR = 1,
        FQDN = 2,
        RFC822_ADDR = 3,
        IPV6_ADDR = 5,
        DER_ASN1_DN = 9,
        DER_ASN1_GN = 10,
        KEY_ID = 11,
    }
}

open_enum! {
    /// Authentication methods, RFC 7296 §3.8 (14: RFC 7427).
    AuthMethod(u8) {
        RSA_SIGNATURE = 1,
        SHARED_KEY_MIC = 2,
        DSS_SIGNATURE = 3,
        DIGITAL_SIGNATURE = 14,
    }
}

open_enum! {
    /// Configuration payload types, RFC 7296 §3.15.
    CfgType(u8) {
        REQUEST = 1,
        REPLY = 2,
        SET = 3,
        ACK = 4,
    }
}

open_enum! {
    /// Configuration attribute types, RFC 7296 §3.15.1.
    CfgAttributeType(u16) {
        INTERNAL_IP4_ADDRESS = 1,
        INTERNAL_IP4_NETMASK = 2,
        INTERNAL_IP4_DNS = 3,
        INTERNAL_IP4_NBNS = 4,
        INTERNAL_IP4_DHCP = 6,
        APPLICATION_VERSION = 7,
        INTERNAL_IP6_ADDRESS = 8,
        INTERNAL_IP6_DNS = 10,
        INTERNAL_IP6_DHCP = 12,
        INTERNAL_IP4_SUBNET = 13,
        SUPPORTED_ATTRIBUTES = 14,
        INTERNAL_IP6_SUBNET = 15,
    }
}

open_enum! {
    /// Traffic selector types, RFC 7296 §3.13.1.
    TsType(u8) {
        IPV4_ADDR_RANGE = 7,
        IPV6_ADDR_RANGE = 8,
    }
}

/// Transform IDs for transform type 1 (ENCR), RFC 7296 §3.3.2; AES-GCM: RFC 5282 §7.
pub mod encr_id {
    pub const AES_CBC: u16 = 12;
    pub const AES_GCM_8: u16 = 18;
    pub const AES_GCM_12: u16 = 19;
    pub const AES_GCM_16: u16 = 20;
}

/// Transform IDs for transform type 2 (PRF), RFC 7296 §3.3.2 / RFC 4868.
pub mod prf_id {
    pub const HMAC_SHA1: u16 = 2;
    pub const HMAC_SHA2_256: u16 = 5;
    pub const HMAC_SHA2_384: u16 = 6;
    pub const HMAC_SHA2_512: u16 = 7;
}

/// Transform IDs for transform type 4 (Diffie-Hellman group), RFC 7296 §3.3.2,
/// RFC 5903 (ECP), RFC 8031 (Curve25519).
pub mod dh_id {
    pub const NONE: u16 = 0;
    pub const MODP_2048: u16 = 14;
    pub const ECP_256: u16 = 19;
    pub const CURVE25519: u16 = 31;
}

/// Transform IDs for transform type 5 (Extended Sequence Numbers), RFC 7296 §3.3.2.
pub mod esn_id {
    pub const NO_ESN: u16 = 0;
    pub const ESN: u16 = 1;
}

/// Transform attribute type Key Length (TV format), RFC 7296 §3.3.5.
pub const ATTR_KEY_LENGTH: u16 = 14;

/// Header flags, RFC 7296 §3.1.
pub mod flags {
    pub const RESPONSE: u8 = 0x20;
    pub const VERSION: u8 = 0x10;
    pub const INITIATOR: u8 = 0x08;
}

/// The Critical bit of the generic payload header, RFC 7296 §3.2.
pub const CRITICAL: u8 = 0x80;

/// Major version of IKEv2, RFC 7296 §3.1.
pub const IKE_MAJOR_VERSION: u8 = 2;
