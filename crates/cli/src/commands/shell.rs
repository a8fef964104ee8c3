//! `completion SHELL` and `man --dir DIR`: generated from the clap command tree, so they
//! always match the commands this binary has.

use std::path::Path;

use clap::CommandFactory as _;

use crate::args::Cli;
use crate::input::InputError;

/// `completion SHELL`: the shell's completion script on stdout.
pub fn completion(shell: clap_complete::Shell) -> anyhow::Result<()> {
    let mut command = Cli::command();
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut command, "fledgectl", &mut script);
    let mut stdout = std::io::stdout().lock();
    std::io::Write::write_all(&mut stdout, &script)?;
    std::io::Write::flush(&mut stdout)?;
    Ok(())
}

/// `man --dir DIR`: `fledgectl.1` and one page per subcommand at every depth
/// (`fledgectl-get-jobs.1`), hidden ones left out; prints each file written.
pub fn man_pages(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)
        .map_err(|source| InputError::Read { path: dir.to_owned(), source })?;
    let mut command = Cli::command();
    command.build();
    let mut written = Vec::new();
    write_pages(&command, "fledgectl", dir, &mut written)?;
    crate::output::emit_lines(&written)?;
    Ok(())
}

fn write_pages(
    command: &clap::Command,
    name: &str,
    dir: &Path,
    written: &mut Vec<String>,
) -> anyhow::Result<()> {
    // The page's title is the full command name, as `man fledgectl-get-jobs` finds it.
    let mut bytes = Vec::new();
    clap_mangen::Man::new(command.clone()).title(name.to_uppercase()).render(&mut bytes)?;
    let path = dir.join(format!("{name}.1"));
    std::fs::write(&path, bytes)
        .map_err(|err| anyhow::anyhow!("cannot write {}: {err}", path.display()))?;
    written.push(path.display().to_string());
    for sub in command.get_subcommands().filter(|sub| !sub.is_hide_set()) {
        if sub.get_name() == "help" {
            continue;
        }
        write_pages(sub, &format!("{name}-{}", sub.get_name()), dir, written)?;
    }
    Ok(())
}
