//! The interactive view: a refreshing table on the alternate screen
//! (ratatui on crossterm). Keys: `q` quits, `s` changes the sort, `p` or
//! space pauses.

use std::time::{Duration, Instant};

use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Cell, Paragraph, Row, Table};
use ratatui::Frame as Screen;

use crate::frame::{frame, Frame, SortBy};
use crate::source::Source;
use crate::text::{cells, header_lines, COLUMNS};

struct State {
    sort: SortBy,
    paused: bool,
    last: Option<Frame>,
    error: Option<String>,
}

fn draw(screen: &mut Screen, source: &Source, s: &State) {
    let [top, table] =
        Layout::vertical([Constraint::Length(4), Constraint::Min(0)]).areas(screen.area());
    let mut lines: Vec<Line> = match &s.last {
        Some(f) => header_lines(&f.header, f.interval_s)
            .into_iter()
            .map(Line::from)
            .collect(),
        None => vec![Line::from("waiting for the first interval...")],
    };
    lines.push(Line::from(format!(
        "{source}  sorted by {}{}  (q quit, s sort, p pause)",
        s.sort.name(),
        if s.paused { "  PAUSED" } else { "" }
    )));
    if let Some(e) = &s.error {
        lines.push(
            Line::from(format!("error: {e}")).style(Style::new().add_modifier(Modifier::REVERSED)),
        );
    }
    screen.render_widget(Paragraph::new(lines), top);
    let Some(f) = &s.last else { return };
    let rows: Vec<[String; 10]> = f.rows.iter().map(cells).collect();
    let mut widths: Vec<u16> = COLUMNS.iter().map(|c| c.len() as u16).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len() as u16);
        }
    }
    let constraints: Vec<Constraint> = widths
        .iter()
        .enumerate()
        .map(|(i, w)| {
            if i + 1 == widths.len() {
                Constraint::Min(*w)
            } else {
                Constraint::Length(*w)
            }
        })
        .collect();
    let right = |i: usize, c: String| {
        let cell = Line::from(c);
        Cell::from(if i == 0 || i + 1 == COLUMNS.len() {
            cell
        } else {
            cell.right_aligned()
        })
    };
    let body: Vec<Row> = rows
        .into_iter()
        .map(|r| Row::new(r.into_iter().enumerate().map(|(i, c)| right(i, c))))
        .collect();
    let head = Row::new(
        COLUMNS
            .iter()
            .enumerate()
            .map(|(i, c)| right(i, c.to_string())),
    )
    .style(Style::new().add_modifier(Modifier::BOLD | Modifier::UNDERLINED));
    screen.render_widget(
        Table::new(body, constraints)
            .header(head)
            .column_spacing(2)
            .block(Block::new()),
        table,
    );
}

/// Runs until `q`.
pub fn run(source: &Source, interval: Duration, sort: SortBy) -> Result<(), String> {
    // Raw mode and key events go through the controlling terminal
    // (/dev/tty): without one, say so rather than panic.
    let mut terminal = ratatui::try_init().map_err(|e| {
        let _ = ratatui::try_restore();
        format!("cannot drive the terminal ({e}); use --once, or pipe the output for plain frames")
    })?;
    let result = run_on(&mut terminal, source, interval, sort);
    let _ = ratatui::try_restore();
    result
}

fn run_on(
    terminal: &mut ratatui::DefaultTerminal,
    source: &Source,
    interval: Duration,
    sort: SortBy,
) -> Result<(), String> {
    let mut s = State {
        sort,
        paused: false,
        last: None,
        error: None,
    };
    let mut prev: Option<(serde_json::Value, Instant)> = None;
    let mut next_fetch = Instant::now();
    loop {
        if !s.paused && Instant::now() >= next_fetch {
            next_fetch = Instant::now() + interval;
            match source.fetch() {
                Ok(now) => {
                    let t = Instant::now();
                    if let Some((then, t0)) = &prev {
                        let mut f = frame(then, &now, t.duration_since(*t0).as_secs_f64());
                        f.sort(s.sort);
                        s.last = Some(f);
                    }
                    prev = Some((now, t));
                    s.error = None;
                }
                Err(e) => s.error = Some(e),
            }
        }
        terminal
            .draw(|screen| draw(screen, source, &s))
            .map_err(|e| e.to_string())?;
        let wait = next_fetch
            .saturating_duration_since(Instant::now())
            .min(Duration::from_millis(250));
        if event::poll(wait).map_err(|e| e.to_string())? {
            if let Event::Key(k) = event::read().map_err(|e| e.to_string())? {
                if k.kind != KeyEventKind::Press {
                    continue;
                }
                match k.code {
                    KeyCode::Char('q') | KeyCode::Esc => return Ok(()),
                    KeyCode::Char('c') if k.modifiers.contains(KeyModifiers::CONTROL) => {
                        return Ok(())
                    }
                    KeyCode::Char('s') => {
                        s.sort = s.sort.next();
                        if let Some(f) = &mut s.last {
                            f.sort(s.sort);
                        }
                    }
                    KeyCode::Char('p') | KeyCode::Char(' ') => {
                        s.paused = !s.paused;
                        // The first frame after a pause covers the pause.
                        next_fetch = Instant::now();
                    }
                    _ => {}
                }
            }
        }
    }
}
