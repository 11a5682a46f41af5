#!/usr/bin/env python3
"""scapy's side of the ESP interop test (driven by scapy_interop.rs).

Reads one request per line on stdin and answers one line per request on
stdout. Byte strings travel as lowercase hex. Requests:

  check
      -> "ok <scapy version>" if scapy with AES-GCM support is importable.
  seal <keymat> <spi> <esn 0|1> <seq> <inner-ip-packet>
      Tunnel-mode ESP in UDP/4500 by scapy's SecurityAssociation with a
      random IV. -> "ok <udp payload>"
  open <keymat> <spi> <esn 0|1> <esn-high> <udp payload>
      -> "ok <next header> <pad length> <padding> <inner-ip-packet>"
         or "fail <exception class>"
  encap <ike message>
      -> "ok <nat keepalive udp payload> <ike udp payload>", both built by
         scapy's NAT_KEEPALIVE and NON_ESP layers.

ESN in scapy: SecurityAssociation takes esn_en and the high 32 bits as
`esn`; it does no inference. The AAD is SPI || esn || seq for AEAD
(RFC 4106 section 5). Because scapy evaluates `seq_num or self.seq_num` and
`esn or self.esn`, a value of 0 passed as an argument is silently replaced;
so this script sets sa.seq_num and sa.esn directly instead.
"""

import sys

OUTER_SRC = "192.0.2.1"
OUTER_DST = "192.0.2.2"
NAT_T_PORT = 4500


def load_scapy():
    from scapy import VERSION
    from scapy.layers import ipsec

    if "AES-GCM" not in ipsec.CRYPT_ALGOS:
        raise ImportError("scapy lacks AES-GCM (is the 'cryptography' package installed?)")
    return VERSION


def security_association(keymat_hex, spi, esn_en, esn_high):
    from scapy.layers.inet import IP, UDP
    from scapy.layers.ipsec import ESP, SecurityAssociation

    sa = SecurityAssociation(
        ESP,
        spi=int(spi),
        crypt_algo="AES-GCM",
        crypt_key=bytes.fromhex(keymat_hex),
        tunnel_header=IP(src=OUTER_SRC, dst=OUTER_DST),
        nat_t_header=UDP(sport=NAT_T_PORT, dport=NAT_T_PORT),
        esn_en=esn_en == "1",
    )
    sa.esn = int(esn_high)
    return sa


def inner_packet(raw_bytes):
    from scapy.layers.inet import IP
    from scapy.layers.inet6 import IPv6

    version = raw_bytes[0] >> 4
    if version == 4:
        return IP(raw_bytes)
    if version == 6:
        return IPv6(raw_bytes)
    raise ValueError("inner packet is neither IPv4 nor IPv6")


def seal(keymat_hex, spi, esn_en, seq, inner_hex):
    from scapy.compat import raw
    from scapy.layers.inet import UDP

    seq = int(seq)
    sa = security_association(keymat_hex, spi, esn_en, seq >> 32)
    sa.seq_num = seq & 0xFFFFFFFF
    sealed = sa.encrypt(inner_packet(bytes.fromhex(inner_hex)))
    return "ok " + raw(sealed[UDP].payload).hex()


def open_(keymat_hex, spi, esn_en, esn_high, udp_payload_hex):
    from scapy.compat import raw
    from scapy.layers.inet import IP, UDP
    from scapy.layers.ipsec import ESP
    from scapy.packet import Raw

    sa = security_association(keymat_hex, spi, esn_en, esn_high)
    datagram = IP(
        raw(
            IP(src=OUTER_DST, dst=OUTER_SRC)
            / UDP(sport=NAT_T_PORT, dport=NAT_T_PORT)
            / Raw(bytes.fromhex(udp_payload_hex))
        )
    )
    if not datagram.haslayer(ESP):
        return "fail NotEsp"
    try:
        # The public, whole-packet path: verify the ICV and decapsulate.
        inner = sa.decrypt(datagram.copy())
        # The same decryption one level down, to see the trailer fields.
        plain = sa.crypt_algo.decrypt(
            sa, datagram[ESP], sa.crypt_key, esn_en=sa.esn_en, esn=sa.esn
        )
    except Exception as error:  # noqa: BLE001 - report any failure by name
        return "fail " + type(error).__name__
    padding = bytes(plain.padding).hex() or "-"
    return "ok %d %d %s %s" % (plain.nh, plain.padlen, padding, raw(inner).hex())


def encap(ike_hex):
    from scapy.compat import raw
    from scapy.layers.ipsec import NAT_KEEPALIVE, NON_ESP
    from scapy.packet import Raw

    keepalive = raw(NAT_KEEPALIVE())
    ike = raw(NON_ESP() / Raw(bytes.fromhex(ike_hex)))
    return "ok %s %s" % (keepalive.hex(), ike.hex())


def answer(words):
    command, args = words[0], words[1:]
    if command == "check":
        return "ok " + load_scapy()
    if command == "seal":
        return seal(*args)
    if command == "open":
        return open_(*args)
    if command == "encap":
        return encap(*args)
    raise ValueError("unknown request " + command)


def main():
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        try:
            reply = answer(words)
        except ImportError as error:
            reply = "missing " + str(error).replace("\n", " ")
        print(reply, flush=True)


if __name__ == "__main__":
    main()
