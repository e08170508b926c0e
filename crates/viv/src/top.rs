//! `viv top`: a live table of sandboxes and VMs (CPU, memory, state, age) in the terminal
//! (ratatui over crossterm), sortable, with keys to kill, pause and resume the selected row.
//!
//! Data: the lists (`GET /sandboxes`, `GET /vms`) are fetched again whenever the server's event
//! stream (`GET /events?kind=sandbox,vm`) reports a change, and with the figures every
//! `--interval`: each running sandbox's latest sample (`GET /sandboxes/{id}/metrics`) and the
//! VMs' QEMU CPU time and memory from `GET /metrics`. The table itself is
//! [`model`](self::model), without I/O.
//!
//! Invariants: the terminal is in raw mode on the alternate screen only while the table
//! shows; [`Screen`] restores it when dropped, on every way out (`q`, Ctrl-C, an error,
//! SIGTERM or SIGHUP, a panic's unwinding); one refresh runs at a time, in its own task, so
//! keys are answered while the server is slow; kill, pause and resume ask for confirmation
//! (`y`) first.

mod model;

use std::collections::HashMap;
use std::io::IsTerminal as _;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context as _, Result};
use crossterm::event::{Event, EventStream, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use futures::StreamExt as _;
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Cell, Paragraph, Row as TableRow, Table as TableWidget, TableState};
use reqwest::Method;
use viv_api::vms::VmInfo;
use viv_api::SandboxInfo;

use self::model::{Kind, Row, SandboxSample, SortKey, Table, VmSample};
use crate::client::Client;

/// `viv top`.
#[derive(Debug, clap::Args)]
pub struct TopArgs {
    /// Seconds between metric refreshes.
    #[arg(long, default_value_t = 2.0)]
    pub interval: f64,
}

/// What the user asked to do to a row, awaiting `y`.
#[derive(Debug, Clone)]
enum Action {
    Kill(Kind, String),
    Pause(Kind, String),
    Resume(Kind, String),
}

impl Action {
    fn describe(&self) -> String {
        let (verb, kind, id) = match self {
            Action::Kill(k, id) => ("Kill", k, id),
            Action::Pause(k, id) => ("Pause", k, id),
            Action::Resume(k, id) => ("Resume", k, id),
        };
        format!("{verb} {} {id}?", kind.as_str())
    }

    fn request(&self) -> (Method, String) {
        match self {
            Action::Kill(Kind::Sandbox, id) => (Method::DELETE, format!("/sandboxes/{id}")),
            Action::Kill(Kind::Vm, id) => (Method::POST, format!("/vms/{id}/kill")),
            Action::Pause(Kind::Sandbox, id) => (Method::POST, format!("/sandboxes/{id}/pause")),
            Action::Pause(Kind::Vm, id) => (Method::POST, format!("/vms/{id}/pause")),
            Action::Resume(Kind::Sandbox, id) => (Method::POST, format!("/sandboxes/{id}/connect")),
            Action::Resume(Kind::Vm, id) => (Method::POST, format!("/vms/{id}/resume")),
        }
    }
}

/// One refresh's results.
struct Snapshot {
    sandboxes: Vec<SandboxInfo>,
    vms: Vec<VmInfo>,
    sandbox_samples: HashMap<String, SandboxSample>,
    vm_samples: HashMap<String, VmSample>,
    at: Instant,
}

/// The terminal in raw mode on the alternate screen; restored when dropped.
struct Screen;

impl Screen {
    fn enter() -> Result<Self> {
        crossterm::terminal::enable_raw_mode().context("putting the terminal in raw mode")?;
        let screen = Self;
        crossterm::execute!(
            std::io::stdout(),
            crossterm::terminal::EnterAlternateScreen,
            crossterm::terminal::Clear(crossterm::terminal::ClearType::All),
            crossterm::cursor::Hide
        )
        .context("switching to the alternate screen")?;
        Ok(screen)
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        let _ = crossterm::execute!(
            std::io::stdout(),
            crossterm::cursor::Show,
            crossterm::terminal::LeaveAlternateScreen
        );
        let _ = crossterm::terminal::disable_raw_mode();
    }
}

/// The app's state between frames.
struct App {
    table: Table,
    confirm: Option<Action>,
    status: String,
    vm_cpu_pct: HashMap<String, f64>,
    last_vm_samples: Option<(Instant, HashMap<String, VmSample>)>,
    counts: (usize, usize),
}

impl App {
    fn new() -> Self {
        Self {
            table: Table::default(),
            confirm: None,
            status: "loading…".into(),
            vm_cpu_pct: HashMap::new(),
            last_vm_samples: None,
            counts: (0, 0),
        }
    }

    fn apply(&mut self, snapshot: Snapshot) {
        if let Some((at, before)) = &self.last_vm_samples {
            let elapsed = snapshot.at.duration_since(*at);
            self.vm_cpu_pct = snapshot
                .vm_samples
                .iter()
                .filter_map(|(id, now)| Some((id.clone(), model::cpu_percent(before.get(id)?, now, elapsed)?)))
                .collect();
        }
        self.last_vm_samples = Some((snapshot.at, snapshot.vm_samples.clone()));
        self.counts = (snapshot.sandboxes.len(), snapshot.vms.len());
        self.table.set_rows(model::rows(
            &snapshot.sandboxes,
            &snapshot.sandbox_samples,
            &snapshot.vms,
            &snapshot.vm_samples,
            &self.vm_cpu_pct,
        ));
    }

    /// Handles a key; `Some(action)` to carry out, `Err(())` to quit.
    fn key(&mut self, key: KeyEvent) -> Result<Option<Action>, ()> {
        if key.kind == KeyEventKind::Release {
            return Ok(None);
        }
        if key.modifiers.contains(KeyModifiers::CONTROL) && key.code == KeyCode::Char('c') {
            return Err(());
        }
        if let Some(action) = self.confirm.take() {
            if matches!(key.code, KeyCode::Char('y') | KeyCode::Char('Y')) {
                self.status = format!("{} …", action.describe().trim_end_matches('?'));
                return Ok(Some(action));
            }
            self.status = "cancelled".into();
            return Ok(None);
        }
        match key.code {
            KeyCode::Char('q') | KeyCode::Esc => return Err(()),
            KeyCode::Up => self.table.move_selection(-1),
            KeyCode::Down => self.table.move_selection(1),
            KeyCode::PageUp => self.table.move_selection(-10),
            KeyCode::PageDown => self.table.move_selection(10),
            KeyCode::Home => self.table.move_selection(-(self.table.rows().len() as isize)),
            KeyCode::End => self.table.move_selection(self.table.rows().len() as isize),
            KeyCode::Char('k') | KeyCode::Delete => {
                if let Some(row) = self.table.selected() {
                    self.confirm = Some(Action::Kill(row.kind, row.id.clone()));
                }
            }
            KeyCode::Char('p') => {
                if let Some(row) = self.table.selected() {
                    self.confirm = match row.pause_action() {
                        Some(true) => Some(Action::Pause(row.kind, row.id.clone())),
                        Some(false) => Some(Action::Resume(row.kind, row.id.clone())),
                        None => {
                            self.status = format!(
                                "{} {} is {}: nothing to pause or resume",
                                row.kind.as_str(),
                                row.id,
                                row.state
                            );
                            None
                        }
                    };
                }
            }
            KeyCode::Char(c) => {
                if let Some(sort) = SortKey::from_key(c) {
                    self.table.sort_by(sort);
                }
            }
            _ => {}
        }
        Ok(None)
    }

    fn draw(&self, frame: &mut ratatui::Frame) {
        let [header, body, status, footer] = Layout::vertical([
            Constraint::Length(1),
            Constraint::Min(1),
            Constraint::Length(1),
            Constraint::Length(1),
        ])
        .areas(frame.area());
        let arrow = if self.table.descending { "▼" } else { "▲" };
        frame.render_widget(
            Paragraph::new(format!(
                "viv top — {} sandboxes, {} VMs — sorted by {} {arrow}",
                self.counts.0,
                self.counts.1,
                self.table.sort.title()
            )),
            header,
        );
        let now = SystemTime::now();
        let titles = [
            (SortKey::Kind, "KIND"),
            (SortKey::Kind, "ID"),
            (SortKey::Name, "NAME"),
            (SortKey::State, "STATE"),
            (SortKey::Cpu, "CPU%"),
            (SortKey::Memory, "MEM"),
            (SortKey::Age, "AGE"),
        ];
        let head = TableRow::new(titles.iter().map(|(key, title)| {
            let style = if *key == self.table.sort && *title != "ID" {
                Style::default().add_modifier(Modifier::BOLD | Modifier::UNDERLINED)
            } else {
                Style::default().add_modifier(Modifier::BOLD)
            };
            Cell::from(*title).style(style)
        }));
        let rows = self.table.rows().iter().map(|row| TableRow::new(cells(row, now)));
        let widths = [
            Constraint::Length(8),
            Constraint::Length(22),
            Constraint::Min(12),
            Constraint::Length(9),
            Constraint::Length(7),
            Constraint::Length(13),
            Constraint::Length(7),
        ];
        let table = TableWidget::new(rows, widths)
            .header(head)
            .row_highlight_style(Style::default().add_modifier(Modifier::REVERSED));
        let mut state = TableState::default().with_selected(self.table.selected_index());
        frame.render_stateful_widget(table, body, &mut state);
        let text = match &self.confirm {
            Some(action) => format!("{} y: yes, any other key: no", action.describe()),
            None => self.status.clone(),
        };
        frame.render_widget(
            Paragraph::new(Line::from(text)).style(Style::default().add_modifier(Modifier::BOLD)),
            status,
        );
        frame.render_widget(
            Paragraph::new(
                "q quit  ↑↓ select  k kill  p pause/resume  sort: c cpu  m mem  a age  n name  s state  K kind",
            ),
            footer,
        );
    }
}

fn cells(row: &Row, now: SystemTime) -> Vec<Cell<'static>> {
    let cpu = row.cpu_pct.map_or_else(|| "-".into(), |c| format!("{c:.1}"));
    let mem = match (row.mem_used, row.mem_total) {
        (Some(used), Some(total)) => format!("{}/{}", model::short_bytes(used), model::short_bytes(total)),
        (None, Some(total)) => format!("-/{}", model::short_bytes(total)),
        _ => "-".into(),
    };
    vec![
        Cell::from(row.kind.as_str()),
        Cell::from(row.id.clone()),
        Cell::from(row.name.clone()),
        Cell::from(row.state.clone()),
        Cell::from(cpu),
        Cell::from(mem),
        Cell::from(row.age(now)),
    ]
}

/// Fetches the lists and the figures.
async fn fetch(client: &Client) -> Result<Snapshot> {
    let sandboxes: Vec<SandboxInfo> = client
        .json(
            client
                .request(Method::GET, "/sandboxes")
                .query(&[("state", "starting,running,paused,failed")]),
        )
        .await?;
    let vms: Vec<VmInfo> = client.json(client.request(Method::GET, "/vms")).await?;
    let prometheus = client
        .send(client.request(Method::GET, "/metrics"))
        .await?
        .text()
        .await?;
    let since = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs().saturating_sub(30));
    let running = sandboxes
        .iter()
        .filter(|s| s.state == viv_api::SandboxState::Running)
        .map(|s| s.sandbox_id.clone());
    let samples = futures::future::join_all(running.map(|id| async move {
        let request = client
            .request(Method::GET, &format!("/sandboxes/{id}/metrics"))
            .query(&[("start", since)]);
        let samples: Vec<SandboxSample> = client.json(request).await.ok()?;
        Some((id, *samples.last()?))
    }))
    .await;
    Ok(Snapshot {
        sandboxes,
        vms,
        sandbox_samples: samples.into_iter().flatten().collect(),
        vm_samples: model::parse_vm_metrics(&prometheus),
        at: Instant::now(),
    })
}

/// Signals `changed` whenever the event stream says something (reconnecting if it breaks).
async fn watch_events(client: Client, changed: tokio::sync::mpsc::Sender<()>) {
    loop {
        let request = client.request(Method::GET, "/events").query(&[("kind", "sandbox,vm")]);
        if let Ok(response) = client.send(request).await {
            let mut body = response.bytes_stream();
            while let Some(Ok(_)) = body.next().await {
                if changed.is_closed() {
                    return;
                }
                let _ = changed.try_send(());
            }
        }
        if changed.is_closed() {
            return;
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

/// Runs `viv top` until `q`.
pub async fn run(client: &Client, args: TopArgs) -> Result<i32> {
    if !std::io::stdout().is_terminal() || !std::io::stdin().is_terminal() {
        bail!("viv top needs a terminal; in scripts use `viv sandbox list` and `viv vm list` (with --json)");
    }
    if !(args.interval.is_finite() && args.interval >= 0.2) {
        bail!("--interval must be at least 0.2 seconds");
    }
    // The first figures before the screen changes: a wrong URL or key is a plain error.
    let first = fetch(client).await?;
    let screen = Screen::enter()?;
    let result = run_screen(client, args, first).await;
    drop(screen);
    result.map(|()| 0)
}

async fn run_screen(client: &Client, args: TopArgs, first: Snapshot) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let backend = ratatui::backend::CrosstermBackend::new(std::io::stdout());
    // No `clear()`: it asks the terminal for the cursor position, which not every terminal
    // answers; the screen was cleared on entering.
    let mut terminal = ratatui::Terminal::new(backend).context("opening the terminal")?;
    let mut app = App::new();
    app.apply(first);
    app.status.clear();
    let mut keys = EventStream::new();
    let (changed_tx, mut changed) = tokio::sync::mpsc::channel(1);
    let watcher = tokio::spawn(watch_events(client.clone(), changed_tx));
    let _stop_watcher = AbortOnDrop(watcher);
    let (done_tx, mut done) = tokio::sync::mpsc::channel::<Result<Snapshot>>(1);
    let (acted_tx, mut acted) = tokio::sync::mpsc::channel::<String>(4);
    let mut tick = tokio::time::interval(Duration::from_secs_f64(args.interval));
    let mut term = signal(SignalKind::terminate())?;
    let mut hangup = signal(SignalKind::hangup())?;
    let mut refreshing = false;
    let mut wanted = false;
    loop {
        if wanted && !refreshing {
            refreshing = true;
            wanted = false;
            let client = client.clone();
            let done = done_tx.clone();
            tokio::spawn(async move {
                let _ = done.send(fetch(&client).await).await;
            });
        }
        terminal.draw(|frame| app.draw(frame))?;
        tokio::select! {
            event = keys.next() => match event {
                Some(Ok(Event::Key(key))) => match app.key(key) {
                    Err(()) => return Ok(()),
                    Ok(Some(action)) => {
                        let client = client.clone();
                        let acted = acted_tx.clone();
                        tokio::spawn(async move {
                            let (method, path) = action.request();
                            let what = action.describe().trim_end_matches('?').to_owned();
                            let message = match client.send(client.request(method, &path)).await {
                                Ok(_) => format!("{what}: done"),
                                Err(e) => format!("{what}: {e:#}"),
                            };
                            let _ = acted.send(message).await;
                        });
                    }
                    Ok(None) => {}
                },
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e).context("reading the terminal"),
                None => return Ok(()),
            },
            Some(message) = acted.recv() => {
                app.status = message;
                wanted = true;
            }
            Some(()) = changed.recv() => wanted = true,
            _ = tick.tick() => wanted = true,
            Some(snapshot) = done.recv() => {
                refreshing = false;
                match snapshot {
                    Ok(snapshot) => app.apply(snapshot),
                    Err(e) => app.status = format!("refresh failed: {e:#}"),
                }
            }
            _ = term.recv() => return Ok(()),
            _ = hangup.recv() => return Ok(()),
        }
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
