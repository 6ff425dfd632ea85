//! The GGUF-built tokenizer must encode exactly like SmolLM2's reference tokenizer.json.

mod common;

fn encode(s: &str) -> Vec<u32> {
    common::smollm().tokenizer.encode(s).expect("encode")
}

#[test]
fn encodes_like_the_reference_tokenizer() {
    assert_eq!(
        encode("The capital of France is"),
        [504, 3575, 282, 4649, 314]
    );
    assert_eq!(
        encode("In 2024, 12345")[..13],
        [788, 216, 34, 32, 34, 36, 28, 216, 33, 34, 35, 36, 37]
    );
    assert_eq!(encode("\n\nleading newlines"), [198, 198, 15957, 725, 5110]);
    assert_eq!(
        encode("<|im_start|>user\nHi<|im_end|>"),
        [1, 4093, 198, 26843, 2]
    );
}

#[test]
fn no_bos_is_added_for_smollm2() {
    let ids = encode("Hello");
    assert_ne!(ids.first(), Some(&1));
    assert_ne!(ids.first(), Some(&0));
}

#[test]
fn round_trips_unicode() {
    let tk = &common::smollm().tokenizer;
    for s in [
        "plain ascii",
        "  two leading spaces and trailing  ",
        "emoji 🦀🎉 and flags 🇫🇷",
        "中文字符和日本語のテキスト",
        "mixed: café, naïve, Ελληνικά, русский, العربية",
        "tabs\tand\nnewlines\r\n",
        "digits 0123456789 and 3.14159",
    ] {
        let ids = tk.encode(s).unwrap();
        assert_eq!(tk.decode(&ids, false).unwrap(), s, "decode of {s:?}");
        assert_eq!(tk.decode_bytes(&ids), s.as_bytes(), "bytes of {s:?}");
    }
}

#[test]
fn token_bytes_are_raw_bytes() {
    let tk = &common::smollm().tokenizer;
    // " Paris" is one token whose bytes begin with a real space.
    let ids = tk.encode(" Paris").unwrap();
    assert_eq!(ids.len(), 1);
    assert_eq!(tk.token_bytes(ids[0]), b" Paris");
    assert_eq!(tk.token_text(ids[0]), " Paris");
    // An emoji split across byte-level tokens: the pieces' bytes concatenate to the UTF-8.
    let ids = tk.encode("🦀").unwrap();
    let bytes: Vec<u8> = ids
        .iter()
        .flat_map(|&i| tk.token_bytes(i).to_vec())
        .collect();
    assert_eq!(bytes, "🦀".as_bytes());
    // Special tokens report their literal text.
    assert!(tk.is_special(2));
    assert_eq!(tk.token_text(2), "<|im_end|>");
}

/// Checks every string of a llama.cpp `.inp`/`.out` pair (test-tokenizer-0's format: strings
/// separated by `\n__ggml_vocab_test__\n`, one line of ids per string) against `tk`, encoding
/// as llama.cpp's test does: no BOS, special tokens' text read as text. Returns the count.
fn check_vectors(
    tk: &tokenscope::model::TextTokenizer,
    inp: &std::path::Path,
    label: &str,
) -> usize {
    check_vectors_against(tk, inp, &inp.with_extension("out"), label)
}

/// [`check_vectors`] with the expected ids from another file.
fn check_vectors_against(
    tk: &tokenscope::model::TextTokenizer,
    inp: &std::path::Path,
    out: &std::path::Path,
    label: &str,
) -> usize {
    let inp = std::fs::read_to_string(inp).unwrap();
    let out = std::fs::read_to_string(out).unwrap();
    let texts: Vec<&str> = inp.split("\n__ggml_vocab_test__\n").collect();
    let expected: Vec<Vec<u32>> = out
        .lines()
        .map(|l| l.split_whitespace().map(|x| x.parse().unwrap()).collect())
        .collect();
    // The .inp ends with a separator line: its last piece is empty and has no .out line.
    let texts = &texts[..expected.len()];
    let mut failures = Vec::new();
    for (text, want) in texts.iter().zip(&expected) {
        let got = tk.encode_literal(text).unwrap();
        if &got != want {
            failures.push(format!("{text:?}: got {got:?}, llama.cpp {want:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{label}: {} of {} differ:\n{}",
        failures.len(),
        texts.len(),
        failures
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    eprintln!("{label}: {} vectors identical to llama.cpp", texts.len());
    texts.len()
}

/// llama.cpp's own tokenizer test vectors, fetched by `scripts/setup.sh --test-assets` from the
/// llama-cpp-python sdist: every string of every vocabulary we claim encodes to exactly
/// llama.cpp's ids. gpt-2, llama-bpe and qwen2 are byte-level BPE; llama-spm and phi-3 are
/// SentencePiece-style (scored pieces).
#[test]
fn llama_cpp_vocabulary_vectors() {
    use candle_core::quantized::gguf_file;
    let dir = common::default_gguf().parent().unwrap().join("vocab");
    for vocab in ["gpt-2", "llama-bpe", "qwen2", "llama-spm", "phi-3"] {
        let path = dir.join(format!("ggml-vocab-{vocab}.gguf"));
        let mut file = std::fs::File::open(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (run ./scripts/setup.sh --test-assets)",
                path.display()
            )
        });
        let content = gguf_file::Content::read(&mut file).unwrap();
        let tk = tokenscope::model::TextTokenizer::from_gguf(&content.metadata)
            .unwrap_or_else(|e| panic!("{vocab}: {e}"));
        let inp = dir.join(format!("ggml-vocab-{vocab}.gguf.inp"));
        assert!(check_vectors(&tk, &inp, vocab) > 40);
        // A prompt gets BOS exactly where llama.cpp adds it (the llama-bpe file has no
        // add_bos_token key: llama.cpp's default for Llama 3 vocabularies is to add it).
        let bos = match vocab {
            "llama-bpe" => Some(128000),
            "llama-spm" | "phi-3" => Some(1),
            _ => None,
        };
        let hello = tk.encode("Hello").unwrap();
        assert_eq!(
            hello.first().copied().filter(|_| hello.len() == 2),
            bos,
            "{vocab}: {hello:?}"
        );
    }
}

/// Gemma 3's vocabulary (262 144 scored pieces, user-defined whitespace runs, no space prefix)
/// from the real model file, against vectors made with llama.cpp itself
/// (`tests/fixtures/gemma3-vocab/`: the standard 46 strings and 2 060 more — whitespace runs,
/// newlines, HTML, control-token text, literal `▁`, CJK, emoji, random mixes — written by
/// tokdump.cpp there, llama.cpp as vendored in llama-cpp-python 0.3.36, add_special = 0,
/// parse_special = 0).
#[test]
fn gemma3_vectors_made_with_llama_cpp() {
    let path = common::default_gguf()
        .parent()
        .unwrap()
        .join("gemma-3-270m-q4_k_m.gguf");
    let mut file = std::fs::File::open(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run ./scripts/setup.sh --test-assets)",
            path.display()
        )
    });
    let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
    let tk = tokenscope::model::TextTokenizer::from_gguf(&content.metadata).unwrap();
    let fixtures =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gemma3-vocab");
    assert_eq!(
        check_vectors(&tk, &fixtures.join("gemma-3-270m.inp"), "gemma3"),
        46
    );
    assert!(
        check_vectors(
            &tk,
            &fixtures.join("gemma-3-270m-extended.inp"),
            "gemma3 extended"
        ) > 2000
    );
    // With special-token parsing and BOS (what a prompt gets): llama.cpp's ids.
    assert_eq!(
        tk.encode("<start_of_turn>user\nhi").unwrap(),
        [2, 105, 2364, 107, 2202]
    );
    assert_eq!(
        tk.encode_literal("<start_of_turn>user\nhi").unwrap(),
        [236820, 3041, 236779, 1340, 236779, 887, 236813, 2364, 107, 2202]
    );
}

/// A byte-level GGUF without `tokenizer.ggml.pre` (GPT-NeoX's, converted before llama.cpp
/// recorded it): llama.cpp splits with its default chain of four regexes, not GPT-2's alone.
/// Its ids for the standard 46 strings and the 2 060 extended ones were made with llama.cpp
/// (tokdump, as for Gemma 3) into `tests/fixtures/gpt-neox-vocab/`.
#[test]
fn vocabularies_without_a_pre_type_split_as_llama_cpp_does() {
    let dir = common::default_gguf().parent().unwrap().join("vocab");
    let path = dir.join("ggml-vocab-gpt-neox.gguf");
    let mut file = std::fs::File::open(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run ./scripts/setup.sh --test-assets)",
            path.display()
        )
    });
    let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
    assert!(!content.metadata.contains_key("tokenizer.ggml.pre"));
    let tk = tokenscope::model::TextTokenizer::from_gguf(&content.metadata).unwrap();
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let standard = check_vectors_against(
        &tk,
        &dir.join("ggml-vocab-llama-spm.gguf.inp"),
        &fixtures.join("gpt-neox-vocab/standard.out"),
        "gpt-neox",
    );
    assert_eq!(standard, 46);
    let extended = check_vectors_against(
        &tk,
        &fixtures.join("gemma3-vocab/gemma-3-270m-extended.inp"),
        &fixtures.join("gpt-neox-vocab/extended.out"),
        "gpt-neox extended",
    );
    assert!(extended > 2000);
}

/// Streaming detokenization (one id at a time, in linear time) gives exactly the text of
/// decoding every id at once, on every vocabulary the suite has (byte-level BPE and
/// SentencePiece, with byte fallback): on llama.cpp's test strings (accents, CJK, emoji,
/// runs of spaces and newlines), and on random id sequences that split characters between
/// tokens and hold special tokens.
#[test]
fn incremental_detokenization_equals_decoding_all_at_once() {
    use candle_core::quantized::gguf_file;
    use rand::{Rng, SeedableRng};
    use tokenscope::engine::detokenize::IncrementalText;
    use tokenscope::model::TextTokenizer;

    let dir = common::default_gguf().parent().unwrap().join("vocab");
    let mut tokenizers: Vec<(String, TextTokenizer)> = Vec::new();
    for vocab in ["gpt-2", "llama-bpe", "qwen2", "llama-spm", "phi-3"] {
        let mut file = std::fs::File::open(dir.join(format!("ggml-vocab-{vocab}.gguf"))).unwrap();
        let content = gguf_file::Content::read(&mut file).unwrap();
        tokenizers.push((
            vocab.into(),
            TextTokenizer::from_gguf(&content.metadata).unwrap(),
        ));
    }
    tokenizers.push(("smollm2".into(), (*common::smollm().tokenizer).clone()));
    tokenizers.push(("gemma3".into(), (*common::gemma3().tokenizer).clone()));
    let text = std::fs::read_to_string(dir.join("ggml-vocab-llama-spm.gguf.inp")).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    for (name, tk) in &tokenizers {
        let mut sequences = vec![tk.encode(&text).unwrap()];
        for _ in 0..20 {
            let n = tk.vocab_size() as u32;
            sequences.push((0..300).map(|_| rng.random_range(0..n)).collect());
        }
        for ids in &sequences {
            let mut inc = IncrementalText::new();
            let whole = tk.decode(ids, true).unwrap();
            for &id in ids {
                let so_far = inc.push(tk, id).unwrap();
                assert!(
                    whole.starts_with(so_far),
                    "{name}: {so_far:?} is not a prefix"
                );
            }
            assert_eq!(inc.finish(tk).unwrap(), whole, "{name}");
        }
    }
}
