//! The WebSocket door: the accept loop and the refuser.
//!
//! [`run_acceptor`] owns the WebSocket `TcpListener`. For each connection it first counts it
//! against its address's limits and the cap ([`Admission::try_admit`]) — before any thread
//! exists — then spawns the connection's reader ([`crate::client::run_reader`]), which does
//! the handshake and asks [`Admission::check_request`] about it. Connections refused at the
//! door go to one refuser thread that answers `503` or `429` and hangs up.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use log::error;

use crate::addresses::AddressSlot;
use crate::admission::Admission;
use crate::client::{self, ReaderContext, READER_STACK_BYTES};
use crate::handshake::{self, Refusal};
use crate::hub::HubCommand;
use crate::shared::Shared;

/// Refused connections waiting for their answer; beyond this they are simply closed.
pub const REFUSAL_QUEUE: usize = 64;
/// How long the refuser waits for a refused client's request before answering anyway.
const REFUSAL_READ_TIMEOUT: Duration = Duration::from_millis(500);
/// Pause after a failed accept (e.g. out of file descriptors) before trying again.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

/// The accept loop. It never ends on an error (it backs off and goes on); it ends when the
/// server is stopping, after [`crate::ServerHandle::shutdown`] shuts the listening socket down.
pub fn run_acceptor(
    listener: TcpListener,
    shared: Arc<Shared>,
    hub: Sender<HubCommand>,
    admission: Arc<Admission>,
    refuser: Sender<(TcpStream, Refusal)>,
) {
    let mut next_id: u64 = 0;
    loop {
        let (stream, peer) = match listener.accept() {
            Ok(accepted) => accepted,
            Err(err) => {
                if shared.stopping.load(Ordering::Acquire) {
                    return;
                }
                error!("websocket accept failed: {err}; retrying");
                thread::sleep(ACCEPT_ERROR_BACKOFF);
                continue;
            }
        };
        if shared.stopping.load(Ordering::Acquire) {
            return;
        }
        let address = match admission.try_admit(peer) {
            Ok(address) => address,
            Err(refusal) => {
                let _ = refuser.try_send((stream, refusal));
                continue;
            }
        };
        next_id += 1;
        spawn_reader(stream, peer, next_id, address, &shared, &hub, &admission);
    }
}

fn spawn_reader(
    stream: TcpStream,
    peer: SocketAddr,
    id: u64,
    address: Option<AddressSlot>,
    shared: &Arc<Shared>,
    hub: &Sender<HubCommand>,
    admission: &Arc<Admission>,
) {
    let slot = ClientSlot(Arc::clone(shared));
    let guard = shared.client_threads.guard();
    let ctx = ReaderContext {
        shared: Arc::clone(shared),
        hub: hub.clone(),
        admission: Arc::clone(admission),
    };
    let spawned = thread::Builder::new()
        .name(format!("ws-reader-{id}"))
        .stack_size(READER_STACK_BYTES)
        .spawn(move || {
            let _slot = slot;
            let _guard = guard;
            client::run_reader(stream, peer, id, address, ctx);
        });
    // On failure the closure, and with it the slot, the guard and the socket, is dropped.
    if let Err(err) = spawned {
        error!("cannot start a reader thread for {peer}: {err}");
    }
}

/// One connection counted against the cap; dropping it (when the reader ends) frees the slot.
struct ClientSlot(Arc<Shared>);

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.0.clients.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The refuser thread: reads what a refused client sent (briefly), answers, hangs up. Reading
/// first matters: closing a socket with unread input makes the kernel send a reset, which can
/// destroy the answer before the client reads it.
pub fn run_refuser(queue: Receiver<(TcpStream, Refusal)>) {
    for (mut stream, refusal) in queue {
        let _ = stream.set_read_timeout(Some(REFUSAL_READ_TIMEOUT));
        let _ = stream.set_write_timeout(Some(REFUSAL_READ_TIMEOUT));
        let mut request = Vec::with_capacity(1024);
        let mut buf = [0u8; 1024];
        while request.len() < 16 * 1024 && !request.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => request.extend_from_slice(&buf[..n]),
            }
        }
        let _ = stream.write_all(handshake::refuse(&refusal).as_bytes());
        let _ = stream.shutdown(std::net::Shutdown::Write);
    }
}
