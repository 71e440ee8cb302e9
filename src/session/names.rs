//! Slot names: `delta_<word><number>`, easy to read aloud and to remember, and
//! recognisably ours (the `delta_` prefix).

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};

/// Every slot this server creates starts with this.
pub(crate) const PREFIX: &str = "delta_";

/// Numbers run from 0 to `NUMBERS - 1`: with the words that makes 336,000 names.
const NUMBERS: u64 = 1000;

#[rustfmt::skip]
const WORDS: &[&str] = &[
    "able", "acid", "aged", "airy", "alert", "alive", "amber", "ample", "angry", "apple", "april",
    "arch", "arctic", "arid", "armed", "aroma", "azure", "baker", "balmy", "bamboo", "basil",
    "beach", "beefy", "berry", "birch", "bison", "bitter", "black", "blade", "bland", "blaze",
    "bliss", "bloom", "blue", "bold", "bonus", "boxer", "brave", "bread", "brick", "brief",
    "bright", "brisk", "broad", "bronze", "brown", "bubbly", "bumpy", "bunny", "busy", "cabin",
    "cactus", "calm", "camel", "candid", "candy", "canoe", "canyon", "carbon", "cargo", "cedar",
    "chalk", "charm", "cheery", "cherry", "chief", "chilly", "cider", "cinder", "civic", "clam",
    "clay", "clean", "clear", "clever", "cliff", "cloud", "clover", "coast", "cobalt", "cocoa",
    "comet", "coral", "cosmic", "cotton", "cozy", "crane", "crisp", "cubic", "curly", "daisy",
    "dance", "dandy", "dapper", "dawn", "deep", "delta", "denim", "desert", "dizzy", "dove",
    "dream", "drift", "dune", "dusty", "eager", "eagle", "early", "earth", "easy", "ebony", "echo",
    "elder", "elm", "ember", "emerald", "epic", "even", "fable", "fair", "falcon", "fancy", "fast",
    "feast", "fern", "fiery", "fig", "finch", "firm", "flame", "flint", "fluffy", "flute", "foggy",
    "forest", "fossil", "fox", "fresh", "frost", "fudge", "funny", "fuzzy", "gala", "garnet",
    "gentle", "giant", "ginger", "glad", "glossy", "golden", "goose", "grand", "grape", "gravel",
    "green", "grove", "gusty", "happy", "harbor", "hardy", "hazel", "heron", "hidden", "honey",
    "hoppy", "humble", "husky", "icy", "indigo", "iris", "ivory", "jade", "jazzy", "jolly", "jumbo",
    "juniper", "keen", "kettle", "kind", "kiwi", "koala", "lagoon", "lake", "lark", "lava", "lemon",
    "level", "lilac", "lime", "linen", "lively", "llama", "lotus", "loyal", "lucky", "lunar",
    "mango", "maple", "marble", "meadow", "mellow", "merry", "mighty", "mild", "mint", "misty",
    "mocha", "modest", "moose", "mossy", "muddy", "mundane", "nectar", "nimble", "noble", "north",
    "nutmeg", "oak", "oasis", "ocean", "olive", "onyx", "opal", "orange", "orbit", "orchid",
    "otter", "owl", "paddle", "palm", "panda", "paper", "peach", "pearl", "pebble", "pecan",
    "pepper", "perky", "piano", "pine", "plaid", "plum", "polar", "poppy", "prairie", "proud",
    "puffin", "quick", "quiet", "quill", "rabbit", "radiant", "rainy", "rapid", "raven", "ready",
    "reef", "regal", "rich", "ripe", "river", "robin", "rocky", "rosy", "royal", "ruby", "rustic",
    "sable", "saffron", "sage", "salty", "sandy", "satin", "savvy", "scarlet", "sea", "shady",
    "sharp", "shiny", "silent", "silk", "silver", "simple", "sky", "sleek", "slow", "smart",
    "smoky", "snowy", "soft", "solar", "sonic", "spicy", "spruce", "steady", "stone", "stormy",
    "sturdy", "sugar", "sunny", "super", "swift", "tame", "tawny", "teal", "tender", "thistle",
    "tidy", "tiger", "timber", "tiny", "topaz", "tulip", "tundra", "turbo", "twin", "umber",
    "urban", "valley", "velvet", "vivid", "walnut", "warm", "wavy", "wild", "willow", "windy",
    "wise", "witty", "wooden", "woolly", "yellow", "young", "zany", "zebra", "zesty",
];

/// A random name such as `delta_face56`. Callers check it against existing slots (and
/// Postgres refuses a duplicate), so randomness only has to make collisions rare.
pub(crate) fn random_name() -> String {
    let r = random_u64();
    let word = WORDS[(r % WORDS.len() as u64) as usize];
    let number = (r / WORDS.len() as u64) % NUMBERS;
    format!("{PREFIX}{word}{number}")
}

/// True for names of the form this module generates (any word, any number), i.e.
/// slots this server may stream and drop.
pub(crate) fn is_ours(name: &str) -> bool {
    let Some(rest) = name.strip_prefix(PREFIX) else { return false };
    let letters = rest.bytes().take_while(u8::is_ascii_lowercase).count();
    let digits = &rest[letters..];
    letters > 0 && !digits.is_empty() && digits.len() <= 20 && digits.bytes().all(|b| b.is_ascii_digit())
}

/// The temporary slot of a viewer watching a session: a name [`is_ours`] refuses, so
/// no listing shows it and no drop reaches it (Postgres drops it with its connection).
/// A backfill's id, or one run of it: `bf_` and 16 hex digits.
pub(crate) fn backfill_id() -> String {
    format!("bf_{:016x}", random_u64())
}

pub(crate) fn watch_slot_name() -> String {
    format!("pgdeltastream_watch_{:016x}", random_u64())
}

/// 64 random bits from the standard library's randomly keyed SipHash: enough for names,
/// without another crate.
fn random_u64() -> u64 {
    let mut h = RandomState::new().build_hasher();
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    h.write_u128(nanos);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_have_the_documented_shape() {
        assert!(WORDS.len() >= 300);
        for _ in 0..1000 {
            let n = random_name();
            assert!(is_ours(&n), "{n}");
            assert!(crate::pg::ident::is_valid_slot_name(&n), "{n}");
        }
    }

    #[test]
    fn watch_slots_are_valid_and_never_taken_for_sessions() {
        for _ in 0..100 {
            let n = watch_slot_name();
            assert!(crate::pg::ident::is_valid_slot_name(&n), "{n}");
            assert!(!is_ours(&n), "{n}: listings and drops would reach a watcher's slot");
        }
    }

    #[test]
    fn names_vary() {
        let names: std::collections::HashSet<String> = (0..200).map(|_| random_name()).collect();
        assert!(names.len() > 150, "only {} distinct names in 200", names.len());
    }

    #[test]
    fn recognises_our_names_only() {
        for ok in ["delta_face56", "delta_mundane69", "delta_a0"] {
            assert!(is_ours(ok), "{ok}");
        }
        for bad in [
            "delta_",
            "delta_56",
            "delta_face",
            "face56",
            "delta_Face56",
            "delta_face56x",
            "xdelta_face56",
            "delta_fa-ce56",
        ] {
            assert!(!is_ours(bad), "{bad}");
        }
    }
}
