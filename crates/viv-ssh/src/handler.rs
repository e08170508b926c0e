//! One russh handler per connection: public-key sign-in against the store, channel opens under
//! the connection's limits, and the replies to channel requests.
//!
//! Replies to `pty-req`, `env`, `shell`, `exec` and `subsystem` are sent here, in the session's
//! own loop, because russh keeps one "wants a reply" flag per channel: a reply sent later from
//! the channel's task could land after the next request reset it and be lost. The channel's
//! task (`session::run`) sees the same requests in the same order and applies the same rules
//! ([`session::env_allowed`], the first start request wins), so both agree on what was
//! accepted.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use russh::keys::{Algorithm, PublicKey};
use russh::server::{Auth, ChannelOpenHandle, Msg, PublicKeyOffer, Session, VerifiedPublicKey};
use russh::{Channel, ChannelId, ChannelOpenFailure, Pty};
use tokio::sync::watch;

use crate::{forward, public_key, session, Shared};

/// Who signed in, and as which sandbox.
#[derive(Debug, Clone)]
pub(crate) struct Identity {
    /// The sandbox the user name named.
    pub sandbox: String,
    /// The API key the SSH key is registered to (which owns the sandbox).
    pub api_key_id: String,
    /// The registered SSH key's id.
    pub ssh_key_id: String,
}

/// Per-channel request bookkeeping for the synchronous replies.
#[derive(Debug, Default)]
struct Requests {
    /// A shell, command or subsystem was started: later start requests and setup are refused.
    started: bool,
}

/// Holds one open channel against the connection's limits and metrics until dropped.
pub(crate) struct ChannelSlot {
    kind: Arc<AtomicUsize>,
    open: Arc<watch::Sender<usize>>,
    shared: Arc<Shared>,
}

impl ChannelSlot {
    /// Takes a slot of a kind whose count is `kind`, unless `max` are taken.
    fn take(
        kind: &Arc<AtomicUsize>,
        max: usize,
        open: &Arc<watch::Sender<usize>>,
        shared: &Arc<Shared>,
    ) -> Option<Self> {
        kind.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n < max).then_some(n + 1))
            .ok()?;
        open.send_modify(|n| *n += 1);
        shared.state.metrics.ssh.channels_open.inc();
        Some(Self {
            kind: kind.clone(),
            open: open.clone(),
            shared: shared.clone(),
        })
    }
}

impl Drop for ChannelSlot {
    fn drop(&mut self) {
        self.kind.fetch_sub(1, Ordering::SeqCst);
        self.open.send_modify(|n| *n = n.saturating_sub(1));
        self.shared.state.metrics.ssh.channels_open.dec();
    }
}

/// Where a connection comes from and goes to (for `SSH_CONNECTION`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Endpoints {
    pub peer: SocketAddr,
    pub local: Option<SocketAddr>,
}

pub(crate) struct Handler {
    shared: Arc<Shared>,
    endpoints: Endpoints,
    identity: Option<Identity>,
    signed_in: watch::Sender<bool>,
    open: Arc<watch::Sender<usize>>,
    sessions: Arc<AtomicUsize>,
    forwards: Arc<AtomicUsize>,
    requests: HashMap<ChannelId, Requests>,
}

impl Handler {
    pub fn new(shared: Arc<Shared>, peer: SocketAddr, local: Option<SocketAddr>) -> Self {
        Self {
            shared,
            endpoints: Endpoints { peer, local },
            identity: None,
            signed_in: watch::channel(false).0,
            open: Arc::new(watch::channel(0).0),
            sessions: Arc::default(),
            forwards: Arc::default(),
            requests: HashMap::new(),
        }
    }

    /// Becomes true once the client signed in.
    pub fn signed_in(&self) -> watch::Receiver<bool> {
        self.signed_in.subscribe()
    }

    /// The number of channels open.
    pub fn open_channels(&self) -> watch::Receiver<usize> {
        self.open.subscribe()
    }

    /// The identity `key` signs in with as `user`, if it may: the key is registered to an
    /// active API key and that API key owns the sandbox `user` names.
    fn authorize(&self, user: &str, key: &PublicKey) -> Option<Identity> {
        if !sandbox_name(user) || public_key::unsupported(key).is_some() {
            return None;
        }
        let store = &self.shared.state.store;
        let fingerprint = public_key::fingerprint(key);
        let registered = match store.ssh_key_by_fingerprint(&fingerprint) {
            Ok(found) => found?,
            Err(err) => {
                tracing::error!(error = %err, "reading SSH keys");
                return None;
            }
        };
        if registered.public_key != public_key::openssh_line(key) {
            return None;
        }
        match store.sandbox_owner(user) {
            Ok(Some(owner)) if owner == registered.api_key_id => Some(Identity {
                sandbox: user.to_owned(),
                api_key_id: registered.api_key_id,
                ssh_key_id: registered.id,
            }),
            Ok(_) => None,
            Err(err) => {
                tracing::error!(error = %err, "reading sandbox owners");
                None
            }
        }
    }

    fn refuse(&self, user: &str, method: &str, fingerprint: Option<String>) -> Auth {
        self.shared.state.metrics.ssh.auth_failures.inc();
        tracing::info!(
            peer = %self.endpoints.peer,
            user = ?user.chars().take(64).collect::<String>(),
            method,
            fingerprint,
            "SSH sign-in refused"
        );
        Auth::reject()
    }

    fn start_request(&mut self, channel: ChannelId, session: &mut Session, accept: bool) -> Result<(), russh::Error> {
        let requests = self.requests.entry(channel).or_default();
        if accept && !requests.started {
            requests.started = true;
            session.channel_success(channel)
        } else {
            self.shared.state.metrics.ssh.channel("refused");
            session.channel_failure(channel)
        }
    }
}

/// Whether a user name can be a sandbox id (anything else is refused without a lookup).
fn sandbox_name(user: &str) -> bool {
    (1..=64).contains(&user.len())
        && user
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// RSA signatures over SHA-1 are refused, as OpenSSH refuses them since 8.8.
fn algorithm_allowed(algorithm: &Algorithm) -> bool {
    !matches!(algorithm, Algorithm::Rsa { hash: None })
}

impl russh::server::Handler for Handler {
    type Error = russh::Error;

    async fn auth_publickey_offered(&mut self, user: &str, offer: PublicKeyOffer<'_>) -> Result<Auth, Self::Error> {
        // Checked in full before the client signs, so an offer tells no more than a signature.
        if algorithm_allowed(offer.algorithm) && self.authorize(user, offer.public_key).is_some() {
            return Ok(Auth::Accept);
        }
        Ok(self.refuse(user, "publickey", Some(public_key::fingerprint(offer.public_key))))
    }

    async fn auth_publickey(&mut self, user: &str, key: VerifiedPublicKey<'_>) -> Result<Auth, Self::Error> {
        match self.authorize(user, key.public_key) {
            Some(identity) if algorithm_allowed(key.algorithm) => {
                tracing::info!(
                    peer = %self.endpoints.peer,
                    sandbox = %identity.sandbox,
                    api_key = %identity.api_key_id,
                    ssh_key = %identity.ssh_key_id,
                    "SSH sign-in"
                );
                self.identity = Some(identity);
                Ok(Auth::Accept)
            }
            _ => Ok(self.refuse(user, "publickey", Some(public_key::fingerprint(key.public_key)))),
        }
    }

    async fn auth_password(&mut self, user: &str, _password: &str) -> Result<Auth, Self::Error> {
        Ok(self.refuse(user, "password", None))
    }

    async fn auth_keyboard_interactive<'a>(
        &'a mut self,
        user: &str,
        _submethods: &str,
        _response: Option<russh::server::Response<'a>>,
    ) -> Result<Auth, Self::Error> {
        Ok(self.refuse(user, "keyboard-interactive", None))
    }

    async fn auth_succeeded(&mut self, _session: &mut Session) -> Result<(), Self::Error> {
        self.signed_in.send_replace(true);
        Ok(())
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(identity) = self.identity.clone() else {
            reply.reject(ChannelOpenFailure::AdministrativelyProhibited).await;
            return Ok(());
        };
        let max = self.shared.limits.max_sessions;
        let Some(slot) = ChannelSlot::take(&self.sessions, max, &self.open, &self.shared) else {
            tracing::info!(peer = %self.endpoints.peer, max, "SSH session refused: too many on this connection");
            self.shared.state.metrics.ssh.channel("refused");
            reply.reject(ChannelOpenFailure::ResourceShortage).await;
            return Ok(());
        };
        self.requests.insert(channel.id(), Requests::default());
        reply.accept().await;
        tokio::spawn(session::run(
            channel,
            session::Context {
                shared: self.shared.clone(),
                identity,
                endpoints: self.endpoints,
                handle: session.handle(),
                _slot: slot,
            },
        ));
        Ok(())
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host_to_connect: &str,
        port_to_connect: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(identity) = self.identity.clone() else {
            reply.reject(ChannelOpenFailure::AdministrativelyProhibited).await;
            return Ok(());
        };
        let port = match u16::try_from(port_to_connect) {
            Ok(port) if port != 0 && forward::host_allowed(host_to_connect) => port,
            _ => {
                tracing::info!(
                    sandbox = %identity.sandbox,
                    host = ?host_to_connect.chars().take(64).collect::<String>(),
                    port = port_to_connect,
                    "SSH forward refused: only ports on the sandbox's loopback are reachable"
                );
                self.shared.state.metrics.ssh.channel("refused");
                reply.reject(ChannelOpenFailure::AdministrativelyProhibited).await;
                return Ok(());
            }
        };
        let max = self.shared.limits.max_forwards;
        let Some(slot) = ChannelSlot::take(&self.forwards, max, &self.open, &self.shared) else {
            tracing::info!(sandbox = %identity.sandbox, max, "SSH forward refused: too many on this connection");
            self.shared.state.metrics.ssh.channel("refused");
            reply.reject(ChannelOpenFailure::ResourceShortage).await;
            return Ok(());
        };
        tokio::spawn(forward::run(channel, reply, self.shared.clone(), identity, port, slot));
        Ok(())
    }

    async fn channel_close(&mut self, channel: ChannelId, _session: &mut Session) -> Result<(), Self::Error> {
        self.requests.remove(&channel);
        Ok(())
    }

    async fn pty_request(
        &mut self,
        channel: ChannelId,
        _term: &str,
        _col_width: u32,
        _row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        _modes: &[(Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if self.requests.get(&channel).is_some_and(|r| !r.started) {
            session.channel_success(channel)
        } else {
            session.channel_failure(channel)
        }
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        variable_name: &str,
        _variable_value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if session::env_allowed(variable_name) && self.requests.get(&channel).is_some_and(|r| !r.started) {
            session.channel_success(channel)
        } else {
            session.channel_failure(channel)
        }
    }

    async fn shell_request(&mut self, channel: ChannelId, session: &mut Session) -> Result<(), Self::Error> {
        self.start_request(channel, session, true)
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        _data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.start_request(channel, session, true)
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.start_request(channel, session, name == session::SFTP)
    }

    async fn x11_request(
        &mut self,
        channel: ChannelId,
        _single_connection: bool,
        _x11_auth_protocol: &str,
        _x11_auth_cookie: &str,
        _x11_screen_number: u32,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_failure(channel)
    }
}
