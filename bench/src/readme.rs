//! Writes a full run's tables into bench/README.md, between two markers, so the figures a
//! reader sees there are always a run's own output and never retyped by hand.

use std::path::Path;

use crate::Result;

pub const BEGIN: &str = "<!-- bench:figures:begin (written by `make bench`; edits here are overwritten) -->";
pub const END: &str = "<!-- bench:figures:end -->";

/// Replaces what lies between the markers in `readme` with `figures`.
pub fn update(readme: &Path, figures: &str) -> Result<()> {
    let text = std::fs::read_to_string(readme)?;
    let updated =
        splice(&text, figures).ok_or_else(|| format!("{}: no {BEGIN} ... {END} markers", readme.display()))?;
    std::fs::write(readme, updated)?;
    Ok(())
}

fn splice(text: &str, figures: &str) -> Option<String> {
    let start = text.find(BEGIN)? + BEGIN.len();
    let end = start + text[start..].find(END)?;
    Some(format!("{}\n\n{}\n{}", &text[..start], figures.trim(), &text[end..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_only_between_the_markers() {
        let text = format!("intro\n{BEGIN}\nold\n{END}\nafter\n");
        assert_eq!(splice(&text, "| new |\n"), Some(format!("intro\n{BEGIN}\n\n| new |\n{END}\nafter\n")));
        assert_eq!(splice("no markers", "x"), None);
    }
}
