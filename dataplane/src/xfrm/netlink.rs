//! A blocking front to `xfrmnetlink`'s asynchronous connection.
//!
//! `SaDriver` is synchronous and may be called from inside the node's tokio runtime, so the
//! netlink connection lives on its own thread with its own single-threaded runtime; each call
//! sends one request there and waits for the kernel's answers (or its ACK / error).
//!
//! ```text
//!  caller ──(message, flags)──► [evpc-xfrm thread: current-thread runtime, xfrmnetlink Handle]
//!         ◄──── Ok(answers) | Err(errno) ◄──── kernel (NETLINK_XFRM)
//! ```

use std::fmt;
use std::io;
use std::thread::JoinHandle;
use std::time::Duration;

use futures::StreamExt;
use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use netlink_packet_xfrm::XfrmMessage;

/// How long one request may take before it is reported as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// A refused or failed netlink request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct NetlinkError {
    /// What was asked (e.g. `NEWSA`).
    pub op: &'static str,
    /// The kernel's errno (positive), or 0 when the request never got an answer.
    pub errno: i32,
    /// Text for the errno.
    pub detail: String,
}

impl fmt::Display for NetlinkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.errno == 0 {
            write!(f, "{}: {}", self.op, self.detail)
        } else {
            write!(
                f,
                "{}: {:?} ({}, errno {})",
                self.op,
                nix::errno::Errno::from_raw(self.errno),
                self.detail,
                self.errno
            )
        }
    }
}

impl NetlinkError {
    fn new(op: &'static str, errno: i32) -> NetlinkError {
        NetlinkError {
            op,
            errno,
            detail: nix::errno::Errno::from_raw(errno).desc().to_owned(),
        }
    }

    fn other(op: &'static str, detail: impl Into<String>) -> NetlinkError {
        NetlinkError {
            op,
            errno: 0,
            detail: detail.into(),
        }
    }
}

struct Job {
    op: &'static str,
    message: NetlinkMessage<XfrmMessage>,
    reply: std::sync::mpsc::Sender<Result<Vec<XfrmMessage>, NetlinkError>>,
}

/// A NETLINK_XFRM connection (through `xfrmnetlink`) usable from synchronous code; dropping it
/// ends its thread. Public for tools and tests that talk to XFRM directly.
pub struct XfrmNetlink {
    jobs: Option<tokio::sync::mpsc::UnboundedSender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl fmt::Debug for XfrmNetlink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Netlink(NETLINK_XFRM)")
    }
}

impl XfrmNetlink {
    /// Opens a NETLINK_XFRM socket on a new thread (in the calling thread's network
    /// namespace: the new thread inherits it).
    pub fn open() -> io::Result<XfrmNetlink> {
        let (jobs, mut queue) = tokio::sync::mpsc::unbounded_channel::<Job>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<io::Result<()>>();
        let thread = std::thread::Builder::new()
            .name("evpc-xfrm".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let (connection, handle, _events) = match xfrmnetlink::new_connection() {
                        Ok(parts) => parts,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    tokio::spawn(connection);
                    let _ = ready_tx.send(Ok(()));
                    while let Some(job) = queue.recv().await {
                        let mut handle = handle.clone();
                        let result = tokio::time::timeout(REQUEST_TIMEOUT, async {
                            let mut answers = Vec::new();
                            let mut stream = handle
                                .request(job.message)
                                .map_err(|e| NetlinkError::other(job.op, e.to_string()))?;
                            while let Some(message) = stream.next().await {
                                match message.payload {
                                    NetlinkPayload::InnerMessage(inner) => answers.push(inner),
                                    NetlinkPayload::Error(error) => {
                                        if let Some(code) = error.code {
                                            return Err(NetlinkError::new(job.op, -code.get()));
                                        }
                                    }
                                    _ => {}
                                }
                            }
                            Ok(answers)
                        })
                        .await
                        .unwrap_or_else(|_| {
                            Err(NetlinkError::other(job.op, "no answer from the kernel"))
                        });
                        let _ = job.reply.send(result);
                    }
                });
            })?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(XfrmNetlink {
                jobs: Some(jobs),
                thread: Some(thread),
            }),
            Ok(Err(e)) => Err(io::Error::new(
                e.kind(),
                format!("opening NETLINK_XFRM: {e}"),
            )),
            Err(_) => Err(io::Error::other(
                "the netlink thread died before it was ready",
            )),
        }
    }

    /// Sends `message` with netlink `flags` (`NLM_F_*`) and returns what the kernel answered:
    /// the answer messages, or the error it sent (`errno`), or an error after 5 s of silence.
    pub fn request(
        &self,
        op: &'static str,
        message: XfrmMessage,
        flags: u16,
    ) -> Result<Vec<XfrmMessage>, NetlinkError> {
        let mut message = NetlinkMessage::from(message);
        message.header.flags = flags;
        let (reply, answer) = std::sync::mpsc::channel();
        let jobs = self
            .jobs
            .as_ref()
            .ok_or_else(|| NetlinkError::other(op, "connection closed"))?;
        jobs.send(Job { op, message, reply })
            .map_err(|_| NetlinkError::other(op, "the netlink thread is gone"))?;
        answer
            .recv()
            .unwrap_or_else(|_| Err(NetlinkError::other(op, "the netlink thread is gone")))
    }

    /// Every state in the namespace (GETSA dump), larval ones included.
    pub fn dump_states(
        &self,
    ) -> Result<Vec<netlink_packet_xfrm::state::ModifyMessage>, NetlinkError> {
        let answers = self.request(
            "GETSA (dump)",
            XfrmMessage::GetDumpSa(netlink_packet_xfrm::state::GetDumpMessage::default()),
            netlink_packet_core::NLM_F_REQUEST | netlink_packet_core::NLM_F_DUMP,
        )?;
        Ok(answers
            .into_iter()
            .filter_map(|m| match m {
                XfrmMessage::AddSa(sa) => Some(sa),
                _ => None,
            })
            .collect())
    }
}

impl Drop for XfrmNetlink {
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
