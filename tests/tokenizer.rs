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

/// llama.cpp's own tokenizer test vectors (tests/test-tokenizer-0: `add_special = false`, no
/// special-token parsing), fetched by `scripts/setup.sh --test-assets` from the llama-cpp-python
/// sdist: every string of every vocabulary we claim must encode to exactly llama.cpp's ids.
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
        let inp =
            std::fs::read_to_string(dir.join(format!("ggml-vocab-{vocab}.gguf.inp"))).unwrap();
        let out =
            std::fs::read_to_string(dir.join(format!("ggml-vocab-{vocab}.gguf.out"))).unwrap();
        let texts: Vec<&str> = inp.split("\n__ggml_vocab_test__\n").collect();
        let expected: Vec<Vec<u32>> = out
            .lines()
            .map(|l| l.split_whitespace().map(|x| x.parse().unwrap()).collect())
            .collect();
        // The .inp ends with a separator line: its last piece is empty and has no .out line.
        let texts = &texts[..expected.len()];
        assert!(texts.len() > 40, "{vocab}: only {} vectors", texts.len());
        let mut failures = Vec::new();
        for (text, want) in texts.iter().zip(&expected) {
            let got = tk.encode_without_special(text).unwrap();
            if &got != want {
                failures.push(format!("{text:?}: got {got:?}, llama.cpp {want:?}"));
            }
        }
        assert!(
            failures.is_empty(),
            "{vocab}: {} of {} differ:\n{}",
            failures.len(),
            texts.len(),
            failures.join("\n")
        );
        eprintln!("{vocab}: {} vectors identical to llama.cpp", texts.len());
    }
}
