//! A single-node IKEv2 endpoint on real UDP sockets: responder with an
//! address pool, or road-warrior initiator with `--connect`. See
//! `tests/support/node.rs` for the options; the strongSwan interop test runs
//! the same code.

#[path = "../tests/support/node.rs"]
mod node;

fn main() {
    node::main(std::env::args().skip(1).collect());
}
