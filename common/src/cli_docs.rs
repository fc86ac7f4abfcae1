//! The binaries' hidden `man` and `completions` subcommands: man pages (clap_mangen) and shell
//! completions (clap_complete) generated from the clap definitions themselves, so that what
//! the packages ship can never drift from what the binaries accept. The Debian packages run
//! them at package time (packaging/build.sh).

use std::io::Write;
use std::path::PathBuf;

/// Flattened into a binary's subcommand enum (`#[command(flatten)]`).
#[derive(clap::Subcommand, Debug, Clone)]
pub enum DocsCommand {
    /// Print the man page (section 1), or write one page per command into --dir.
    #[command(hide = true)]
    Man(ManArgs),
    /// Print a shell completion script.
    #[command(hide = true)]
    Completions(CompletionsArgs),
}

#[derive(clap::Args, Debug, Clone)]
pub struct ManArgs {
    /// Write NAME.1 and NAME-SUBCOMMAND.1 for every visible subcommand into this directory
    /// instead of printing the top-level page.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

#[derive(clap::Args, Debug, Clone)]
pub struct CompletionsArgs {
    /// The shell.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

/// Runs a docs subcommand for `cmd` (the binary's `CommandFactory::command()`), writing to
/// stdout or into `--dir`.
pub fn run(docs: &DocsCommand, cmd: clap::Command) -> std::io::Result<()> {
    let name = cmd.get_name().to_string();
    match docs {
        DocsCommand::Man(ManArgs { dir: Some(dir) }) => {
            std::fs::create_dir_all(dir)?;
            clap_mangen::generate_to(cmd.clone(), dir)?;
            // The top page again, with its long help as a section of its own.
            let mut f = std::fs::File::create(dir.join(format!("{name}.1")))?;
            render_top(cmd, &mut f)
        }
        DocsCommand::Man(ManArgs { dir: None }) => {
            let mut out = std::io::stdout().lock();
            render_top(cmd, &mut out)?;
            out.flush()
        }
        DocsCommand::Completions(CompletionsArgs { shell }) => {
            let mut cmd = cmd;
            let mut out = std::io::stdout().lock();
            clap_complete::generate(*shell, &mut cmd, name, &mut out);
            out.flush()
        }
    }
}

/// A command's page, where the text after its long help (a first line that is the section's
/// title, then lines laid out by hand, such as a table of configuration keys) becomes a section
/// shown as written. clap_mangen would fill those lines into one paragraph under "EXTRA".
fn render_top(cmd: clap::Command, w: &mut dyn Write) -> std::io::Result<()> {
    let extra = cmd.get_after_long_help().map(|t| t.to_string());
    let bare = cmd.after_long_help(None::<&'static str>);
    clap_mangen::Man::new(bare).render(w)?;
    let Some(extra) = extra else {
        return Ok(());
    };
    let mut lines = extra.lines();
    let title = lines.next().unwrap_or("NOTES").trim();
    writeln!(w, ".SH {}", roff_line(title))?;
    writeln!(w, ".nf")?;
    for l in lines {
        writeln!(w, "{}", roff_line(l))?;
    }
    writeln!(w, ".fi")
}

/// One line of roff text, taken literally: backslashes escaped, and a leading `.` or `'` (a
/// request) or a blank line (a paragraph break outside `.nf`) kept as text.
fn roff_line(l: &str) -> String {
    let l = l.replace('\\', "\\e");
    if l.starts_with('.') || l.starts_with('\'') {
        format!("\\&{l}")
    } else {
        l
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use clap::{CommandFactory, Parser, Subcommand};

    #[derive(Parser)]
    #[command(
        name = "demo",
        version,
        about = "A demo",
        after_long_help = "SETTINGS\n  key_one    the first [1]\n.dotted kept as text"
    )]
    struct Cli {
        #[command(subcommand)]
        command: Cmd,
    }

    #[derive(Subcommand)]
    enum Cmd {
        /// Does a thing.
        Thing,
        #[command(flatten)]
        Docs(DocsCommand),
    }

    #[test]
    fn man_pages_cover_visible_subcommands_only() {
        let dir = tempfile::tempdir().unwrap();
        let cli =
            Cli::try_parse_from(["demo", "man", "--dir", dir.path().to_str().unwrap()]).unwrap();
        let Cmd::Docs(d) = cli.command else {
            panic!("not a docs command")
        };
        run(&d, Cli::command()).unwrap();
        let mut names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["demo-thing.1", "demo.1"]);
        let top = std::fs::read_to_string(dir.path().join("demo.1")).unwrap();
        assert!(top.contains(".TH demo 1"), "{top}");
        // The long help is a section of its own, its lines as written.
        assert!(
            top.contains(
                ".SH SETTINGS\n.nf\n  key_one    the first [1]\n\\&.dotted kept as text\n.fi"
            ),
            "{top}"
        );
        assert!(!top.contains("EXTRA"), "{top}");
        assert!(
            !top.contains("completions"),
            "hidden subcommands leak: {top}"
        );
    }

    #[test]
    fn completions_parse_every_shell() {
        for sh in ["bash", "zsh", "fish"] {
            assert!(Cli::try_parse_from(["demo", "completions", sh]).is_ok());
        }
        assert!(Cli::try_parse_from(["demo", "completions", "cmd.exe"]).is_err());
    }
}
