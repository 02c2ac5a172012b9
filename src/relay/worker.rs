//! The relay thread: the schedule, the envelopes, and the notices.
//!
//! It alone writes queue envelopes. Each due message is split into one
//! delivery per destination, run on up to `THREADS_PER_MESSAGE` delivery
//! threads that take the destinations in turn (at most `MAX_PARALLEL`
//! messages at once), so a slow host holds up one thread, not the others;
//! each result comes back over a channel and is recorded in the envelope
//! durably before the next one is taken.

use std::collections::{HashMap, HashSet};
use std::io;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crossbeam_channel::{select, Receiver, Sender};
use log::{debug, error, info, warn};

use super::attempt::{domain_of, read_header, Deliverer, Dest, IDLE_FOR};
use super::bounce::{self, Entry, Kind};
use super::client::RcptResult;
use super::dns::Resolver;
use super::schedule::Schedule;
use super::transfer::Timeouts;
use crate::pool::Pool;
use crate::server::Context;
use crate::smtp::conn::unix_now;
use crate::store::envelope::{Envelope, RcptState};

/// What the relay thread is asked to do.
#[derive(Debug)]
pub enum Request {
    /// A message was committed to the queue.
    Queued(String),
    /// Try now: one message, or every message.
    Flush(Option<String>),
    /// Remove a message from the queue; the result is sent back.
    Delete(String, Sender<Result<(), String>>),
}

/// The longest the thread sleeps without looking at the clock again.
const MAX_SLEEP: Duration = Duration::from_secs(3600);
/// Messages being delivered at the same time.
const MAX_PARALLEL: usize = 8;
/// Delivery threads one message may use (its destinations share them).
const THREADS_PER_MESSAGE: usize = 4;
/// A delivery thread blocks on one socket and keeps its buffers on the heap.
const DELIVERY_STACK: usize = 256 * 1024;
/// Marks envelopes of notices we generated (their sender is `<>`, so a
/// failed one is never bounced, only given to the postmaster if configured).
const NOTICE_CLIENT: &str = "postling notice";
/// Marks the copy given to the postmaster: if that fails too, it is only
/// logged, so nothing can loop.
const DOUBLE_BOUNCE_CLIENT: &str = "postling double-bounce";

/// One destination's results for one message: (recipient index, result,
/// the host that gave it).
type Results = Vec<(usize, RcptResult, Option<String>)>;

/// A message whose attempt is running.
struct Flight {
    /// Destinations not yet reported.
    waiting: usize,
    /// Recipients that failed in this attempt, each with its state before
    /// it: until their notice has gone out, that is the state on disk.
    newly_failed: Vec<(usize, RcptState)>,
    remote_mta: HashMap<usize, String>,
}

struct Relay {
    ctx: Arc<Context>,
    schedule: Schedule,
    deliverer: Arc<Deliverer>,
    /// Every queued envelope, by id.
    pending: HashMap<String, Envelope>,
    /// Ids to try at the next pass whatever the schedule says.
    forced: HashSet<String>,
    in_flight: HashMap<String, Flight>,
    results_tx: Sender<(String, Results)>,
    /// Entries were removed since the last fsync of `queue/`.
    unsynced_removals: bool,
    /// The delivery threads.
    threads: Arc<Pool>,
}

/// Starts the relay thread. A `relay.ca_file` that holds no certificate
/// fails here, at start, rather than at the first delivery.
pub fn spawn(ctx: Arc<Context>, requests: Receiver<Request>) -> io::Result<JoinHandle<()>> {
    let relay_cfg = &ctx.config().relay;
    if let Some(ca) = &relay_cfg.ca_file {
        crate::tls::check_ca_file(ca).map_err(|e| io::Error::other(format!("relay TLS: {e}")))?;
    }
    let deliverer = Arc::new(Deliverer::new(
        Arc::clone(&ctx),
        Resolver::new(&relay_cfg.dns_servers),
        relay_cfg.ca_file.clone(),
        crate::tls::insecure_client_config(),
        Timeouts::default(),
    ));
    let (results_tx, results) = crossbeam_channel::unbounded();
    let relay = Relay {
        schedule: Schedule {
            retry: relay_cfg.retry.clone(),
            max_queue_time: relay_cfg.max_queue_time,
            delay_warning: relay_cfg.delay_warning,
        },
        deliverer,
        pending: HashMap::new(),
        forced: HashSet::new(),
        in_flight: HashMap::new(),
        results_tx,
        unsynced_removals: false,
        threads: Arc::new(Pool::new("deliver", DELIVERY_STACK)),
        ctx,
    };
    thread::Builder::new()
        .name("relay".into())
        .spawn(move || relay.run(requests, results))
}

impl Relay {
    fn run(mut self, requests: Receiver<Request>, results: Receiver<(String, Results)>) {
        loop {
            let now = unix_now();
            let wait = match self.next_due(now) {
                Some(due) if due <= now => Duration::ZERO,
                Some(due) => Duration::from_secs(due - now).min(MAX_SLEEP),
                None => MAX_SLEEP,
            };
            // Sessions kept open for the next message are closed on time.
            let wait = if self.deliverer.close_expired() {
                wait.min(IDLE_FOR)
            } else {
                wait
            };
            select! {
                recv(requests) -> req => match req {
                    Ok(req) => self.handle(req),
                    Err(_) => return self.sync_removals(),
                },
                recv(results) -> r => {
                    // The sender lives in `self`, so this cannot fail.
                    if let Ok((id, results)) = r {
                        self.record(&id, results);
                    }
                },
                default(wait) => {},
            }
            // Take everything already waiting before starting deliveries.
            while let Ok(req) = requests.try_recv() {
                self.handle(req);
            }
            while let Ok((id, results)) = results.try_recv() {
                self.record(&id, results);
            }
            self.sync_removals();
            self.run_due();
        }
    }

    /// One fsync for every entry removed in this pass of the loop, rather
    /// than one per delivered message: under load, the results that arrive
    /// during one sync are removed together and made durable by the next.
    fn sync_removals(&mut self) {
        if std::mem::take(&mut self.unsynced_removals) {
            if let Err(e) = self.ctx.queue.sync_removals() {
                // The entries are gone from the directory; at worst a crash
                // brings some back and they are delivered again.
                error!("cannot sync the queue directory after removals: {e}");
            }
        }
    }

    fn next_due(&self, now: u64) -> Option<u64> {
        if self.in_flight.len() >= MAX_PARALLEL {
            return None; // woken by a result
        }
        if self
            .forced
            .iter()
            .any(|id| self.pending.contains_key(id) && !self.in_flight.contains_key(id))
        {
            return Some(0);
        }
        self.pending
            .iter()
            .filter(|(id, _)| !self.in_flight.contains_key(*id))
            .map(|(_, e)| self.schedule.next_due(e, now))
            .min()
    }

    fn handle(&mut self, req: Request) {
        match req {
            Request::Queued(id) => self.load(&id),
            Request::Flush(None) => {
                info!(
                    "flush: trying all {} queued message(s) now",
                    self.pending.len()
                );
                self.forced.extend(self.pending.keys().cloned());
            }
            Request::Flush(Some(id)) => {
                if !self.pending.contains_key(&id) {
                    self.load(&id);
                }
                if self.pending.contains_key(&id) {
                    info!("id={id} flush: trying now");
                    self.forced.insert(id);
                }
            }
            Request::Delete(id, reply) => {
                // A delivery still running for it reports into nothing.
                self.pending.remove(&id);
                self.forced.remove(&id);
                self.in_flight.remove(&id);
                let result = self.ctx.queue.remove(&id).map_err(|e| e.to_string());
                if result.is_ok() {
                    info!("id={id} status=deleted (by the queue tool)");
                }
                let _ = reply.send(result);
            }
        }
    }

    fn load(&mut self, id: &str) {
        match self.ctx.queue.load(id) {
            Ok(env) => {
                self.pending.insert(id.to_string(), env);
            }
            Err(e) => error!("id={id} cannot load envelope: {e}"),
        }
    }

    /// Starts every due attempt, oldest due first, up to MAX_PARALLEL.
    fn run_due(&mut self) {
        let now = unix_now();
        let mut due: Vec<(u64, String)> = self
            .pending
            .iter()
            .filter(|(id, _)| !self.in_flight.contains_key(*id))
            .map(|(id, e)| (self.schedule.next_due(e, now), id.clone()))
            .filter(|(d, id)| *d <= now || self.forced.contains(id))
            .collect();
        due.sort();
        for (_, id) in due {
            if self.in_flight.len() >= MAX_PARALLEL {
                break;
            }
            self.forced.remove(&id);
            self.start(&id);
        }
    }

    /// Starts one delivery thread per destination of `id`'s unfinished
    /// recipients.
    fn start(&mut self, id: &str) {
        let Some(env) = self.pending.get(id) else {
            return;
        };
        if !self.ctx.queue.contains(id) {
            warn!("id={id} queue entry gone; dropping it from the relay");
            self.pending.remove(id);
            self.forced.remove(id);
            return;
        }
        let todo: Vec<usize> = (0..env.recipients.len())
            .filter(|&i| !env.recipients[i].state.is_final())
            .collect();
        let groups = self.group(env, &todo);
        self.in_flight.insert(
            id.to_string(),
            Flight {
                waiting: groups.len(),
                newly_failed: Vec::new(),
                remote_mta: HashMap::new(),
            },
        );
        if groups.is_empty() {
            self.finish(id);
            return;
        }
        // A message to many domains shares a few threads, each taking the
        // next destination when it is done with one, so a silent host holds
        // up one thread, not the domains behind it: eight 100-domain
        // messages would otherwise start 800 threads and as many sockets.
        let threads = groups.len().min(THREADS_PER_MESSAGE);
        let work = Arc::new(std::sync::Mutex::new(groups));
        let mut started = 0;
        for _ in 0..threads {
            let (env, tx) = (env.clone(), self.results_tx.clone());
            let (deliverer, work) = (Arc::clone(&self.deliverer), Arc::clone(&work));
            let job_id = id.to_string();
            let spawned = self.threads.run(move || loop {
                let next = work.lock().unwrap_or_else(|p| p.into_inner()).pop();
                let Some((dest, idxs)) = next else { break };
                let results = deliverer.deliver_to(&env, &dest, &idxs);
                let _ = tx.send((job_id.clone(), results));
            });
            match spawned {
                Ok(()) => started += 1,
                // Another thread takes the work.
                Err(e) => error!("id={id} cannot start a delivery thread: {e}"),
            }
        }
        if started == 0 {
            // Nobody will take the list: reported as deferred, so the
            // attempt still completes.
            let left = std::mem::take(&mut *work.lock().unwrap_or_else(|p| p.into_inner()));
            for (_, idxs) in left {
                let results =
                    idxs_deferred(&idxs, "local error: no delivery thread could be started");
                let _ = self.results_tx.send((id.to_string(), results));
            }
        }
    }

    /// Unfinished recipients grouped by where they go: one group for the
    /// smarthost, else one per domain.
    fn group(&self, env: &Envelope, todo: &[usize]) -> Vec<(Dest, Vec<usize>)> {
        let mut groups: Vec<(Dest, Vec<usize>)> = Vec::new();
        for &i in todo {
            let dest = match &self.ctx.config().relay.smarthost {
                Some(_) => Dest::Smarthost,
                None => Dest::Domain(domain_of(&env.recipients[i].address).to_ascii_lowercase()),
            };
            match groups.iter_mut().find(|(d, _)| *d == dest) {
                Some((_, v)) => v.push(i),
                None => groups.push((dest, vec![i])),
            }
        }
        groups
    }

    /// Records one destination's results in the envelope, durably.
    fn record(&mut self, id: &str, results: Results) {
        let (Some(env), Some(flight)) = (self.pending.get_mut(id), self.in_flight.get_mut(id))
        else {
            return; // deleted meanwhile
        };
        let now = unix_now();
        for (i, result, host) in results {
            let addr = env.recipients[i].address.clone();
            let delay = now.saturating_sub(env.arrived);
            let relay_name = host.clone().unwrap_or_else(|| "none".into());
            let state = match result {
                RcptResult::Delivered { reply } => {
                    info!("id={id} to=<{addr}> relay={relay_name} delay={delay}s status=sent ({reply})");
                    RcptState::Delivered
                }
                RcptResult::Deferred { reason } => {
                    info!("id={id} to=<{addr}> relay={relay_name} delay={delay}s status=deferred ({reason})");
                    RcptState::Deferred { reason }
                }
                RcptResult::Failed { reason } => {
                    info!("id={id} to=<{addr}> relay={relay_name} delay={delay}s status=bounced ({reason})");
                    RcptState::Failed { reason }
                }
            };
            let before = std::mem::replace(&mut env.recipients[i].state, state);
            if matches!(env.recipients[i].state, RcptState::Failed { .. }) {
                flight.newly_failed.push((i, before));
            }
            if let Some(h) = host {
                flight.remote_mta.insert(i, h);
            }
        }
        flight.waiting = flight.waiting.saturating_sub(1);
        if flight.waiting > 0 {
            // Saved now, so a crash before the other destinations report
            // never re-sends to these recipients. A failure is saved only
            // once its notice has gone out (in `finish`): until then the
            // disk keeps the state before it, so after a crash the
            // recipient is tried again and fails again, rather than
            // counting as done with nobody told.
            let mut saved = env.clone();
            for (i, before) in &flight.newly_failed {
                saved.recipients[*i].state = before.clone();
            }
            if let Err(e) = self.ctx.queue.save(&saved) {
                error!("id={id} cannot save envelope: {e}");
            }
            return;
        }
        self.finish(id);
    }

    /// Ends an attempt: counts it, expires, sends notices, saves or removes.
    fn finish(&mut self, id: &str) {
        let (Some(mut env), Some(mut flight)) =
            (self.pending.remove(id), self.in_flight.remove(id))
        else {
            return;
        };
        let now = unix_now();
        env.attempts = env.attempts.saturating_add(1);
        env.tried = now;
        let expired = self.schedule.expired(&env, now);
        if expired {
            let limit = human(self.schedule.max_queue_time);
            for (i, r) in env.recipients.iter_mut().enumerate() {
                let last = match &r.state {
                    RcptState::Pending => "never tried".to_string(),
                    RcptState::Deferred { reason } => reason.clone(),
                    RcptState::Delivered | RcptState::Failed { .. } => continue,
                };
                let reason = format!("4.4.7 delivery time expired ({limit}); last error: {last}");
                info!("id={id} to=<{}> status=expired ({reason})", r.address);
                let before = std::mem::replace(&mut r.state, RcptState::Failed { reason });
                flight.newly_failed.push((i, before));
            }
        }
        // Notices go out before the envelope is saved: a crash in between
        // repeats a notice rather than losing it.
        if !flight.newly_failed.is_empty() {
            let failed: Vec<usize> = flight.newly_failed.iter().map(|(i, _)| *i).collect();
            let entries = entries(&env, &failed, &flight.remote_mta);
            if !self.notify(&env, &entries, Kind::Failed) {
                if expired {
                    error!(
                        "id={} the bounce could not be stored before the message expired; \
                         the failures above are not notified",
                        env.id
                    );
                } else {
                    // Not stored (disk full): these stay unfinished, so the
                    // next attempt fails them and tries the bounce again,
                    // rather than nobody ever being told.
                    for (i, before) in flight.newly_failed {
                        env.recipients[i].state = before;
                    }
                }
            }
        } else if self.schedule.should_warn(&env, now) {
            let deferred: Vec<usize> = (0..env.recipients.len())
                .filter(|&i| matches!(env.recipients[i].state, RcptState::Deferred { .. }))
                .collect();
            // A notice that could not be stored (disk full) is tried again
            // at the next attempt, like a bounce.
            env.warned = deferred.is_empty() || {
                let entries = entries(&env, &deferred, &flight.remote_mta);
                self.notify(&env, &entries, Kind::Delayed)
            };
        }
        if env.recipients.iter().all(|r| r.state.is_final()) {
            // A flush that came while this attempt ran is done with too: a
            // forced id that is no longer queued would make every pass of
            // the loop due at once.
            self.forced.remove(id);
            match self.ctx.queue.remove_unsynced(id) {
                Ok(()) => {
                    self.unsynced_removals = true;
                    info!("id={id} status=removed (all recipients done)");
                }
                Err(e) => error!("id={id} cannot remove finished entry: {e}"),
            }
            return;
        }
        if let Err(e) = self.ctx.queue.save(&env) {
            // The old envelope stays: the next attempt may repeat a
            // delivery (a duplicate), never skip one.
            error!("id={id} cannot save envelope: {e}");
        }
        debug!(
            "id={id} next attempt at {}",
            self.schedule.next_due(&env, now)
        );
        self.pending.insert(id.to_string(), env);
    }

    /// Sends a bounce or delay notice about `env` to its sender. A notice
    /// about a notice, or about a message from `<>`, is only logged (or
    /// given to the local postmaster when so configured): bounces never
    /// bounce. False when a notice was due and could not be stored.
    fn notify(&self, env: &Envelope, entries: &[Entry<'_>], kind: Kind) -> bool {
        let (to, client) = if env.sender.is_empty() {
            warn!(
                "id={} undeliverable message from <{}>: not bounced (a bounce never bounces)",
                env.id, env.sender
            );
            if kind != Kind::Failed
                || !self.ctx.config().relay.double_bounce_to_postmaster
                || env.client == DOUBLE_BOUNCE_CLIENT
            {
                return true;
            }
            let domain = self.ctx.config().local.first_domain().to_string();
            (format!("postmaster@{domain}"), DOUBLE_BOUNCE_CLIENT)
        } else {
            (env.sender.clone(), NOTICE_CLIENT)
        };
        let header = (self.ctx.queue.open_message(&env.id))
            .and_then(|mut f| read_header(&mut f))
            .unwrap_or_default();
        let text = bounce::render(
            kind,
            &self.ctx.config().hostname,
            &to,
            env,
            entries,
            &header,
            unix_now(),
        );
        match crate::deliver::inject(&self.ctx, &to, &text, client) {
            Ok(nid) => {
                info!("id={} notice={nid} kind={kind:?} to=<{to}>", env.id);
                true
            }
            Err(e) => {
                error!(
                    "id={} cannot queue the {kind:?} notice to <{to}>: {e}",
                    env.id
                );
                false
            }
        }
    }
}

/// "5d", "12h", "30m", "45s": the largest whole unit.
fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        _ if s >= 86_400 && s.is_multiple_of(86_400) => format!("{}d", s / 86_400),
        _ if s >= 3600 && s.is_multiple_of(3600) => format!("{}h", s / 3600),
        _ if s >= 60 && s.is_multiple_of(60) => format!("{}m", s / 60),
        _ => format!("{s}s"),
    }
}

fn idxs_deferred(idxs: &[usize], reason: &str) -> Results {
    idxs.iter()
        .map(|&i| {
            (
                i,
                RcptResult::Deferred {
                    reason: reason.to_string(),
                },
                None,
            )
        })
        .collect()
}

/// Bounce entries for the given recipients.
fn entries<'a>(
    env: &'a Envelope,
    idxs: &[usize],
    remote: &'a HashMap<usize, String>,
) -> Vec<Entry<'a>> {
    idxs.iter()
        .map(|&i| {
            let r = &env.recipients[i];
            let diagnostic = match &r.state {
                RcptState::Failed { reason } | RcptState::Deferred { reason } => reason.as_str(),
                _ => "",
            };
            Entry {
                address: &r.address,
                diagnostic,
                remote_mta: remote.get(&i).map(String::as_str),
            }
        })
        .collect()
}
