//! Static checks of the Dockerfile, .dockerignore and Kubernetes manifests against the service:
//! binary name, port 8000, probe paths, env var names and values, image names, file references.
//! Reads text and YAML only; builds and runs nothing.

use std::fs;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_yaml::Value;

const BINARY: &str = "tokenscope";
const PORT: u64 = 8000;
const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const BASE: &str = "deploy/kubernetes/base";
const GPU: &str = "deploy/kubernetes/overlays/gpu";

/// The TOKENSCOPE_* variables `tokenscope serve` reads; `known_env` adds any other
/// `env = "..."` of src/cli.rs.
const KNOWN_ENV: &[&str] = &[
    "TOKENSCOPE_HOST",
    "TOKENSCOPE_PORT",
    "TOKENSCOPE_MODEL",
    "TOKENSCOPE_DEVICE",
    "TOKENSCOPE_DTYPE",
    "TOKENSCOPE_API_KEYS",
    "TOKENSCOPE_API_KEY_FILE",
    "TOKENSCOPE_MAX_QUEUE",
    "TOKENSCOPE_REQUEST_TIMEOUT",
    "TOKENSCOPE_MAX_PROMPT_TOKENS",
    "TOKENSCOPE_MAX_BODY_BYTES",
    "TOKENSCOPE_LOG_FORMAT",
    "TOKENSCOPE_PUBLIC_METRICS",
    "TOKENSCOPE_PROTECT_DOCS",
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    let path = root().join(rel);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// KNOWN_ENV plus every `env = "NAME"` attribute in src/cli.rs.
fn known_env() -> Vec<String> {
    let mut known: Vec<String> = KNOWN_ENV.iter().map(ToString::to_string).collect();
    for piece in read("src/cli.rs").split("env = \"").skip(1) {
        if let Some((name, _)) = piece.split_once('"') {
            known.push(name.to_string());
        }
    }
    known
}

// ---------------------------------------------------------------------------------------------
// Dockerfile

/// One Dockerfile instruction: upper-cased keyword and its arguments.
struct Instruction {
    keyword: String,
    args: String,
}

/// Instructions with comment and blank lines dropped and `\` continuations joined.
fn dockerfile() -> Vec<Instruction> {
    let text = read("Dockerfile");
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(head) => {
                current.push_str(head);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                out.push(instruction(&current));
                current.clear();
            }
        }
    }
    if !current.trim().is_empty() {
        out.push(instruction(&current));
    }
    assert!(!out.is_empty(), "the Dockerfile has no instructions");
    out
}

fn instruction(line: &str) -> Instruction {
    let line = line.trim();
    let (keyword, args) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
    Instruction {
        keyword: keyword.to_uppercase(),
        args: args.trim().to_string(),
    }
}

/// The instructions of the last stage (the image that is shipped).
fn final_stage(all: &[Instruction]) -> &[Instruction] {
    let last_from = all
        .iter()
        .rposition(|i| i.keyword == "FROM")
        .expect("a FROM instruction");
    &all[last_from..]
}

/// Leading `--flag[=value]` options, then the remaining words (shell or JSON form).
fn flags_and_words(args: &str) -> (Vec<String>, Vec<String>) {
    let mut flags = Vec::new();
    let mut rest = args.trim();
    while rest.starts_with("--") {
        let (flag, tail) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
        flags.push(flag.to_string());
        rest = tail.trim_start();
    }
    let words = if rest.starts_with('[') {
        serde_json::from_str(rest).unwrap_or_else(|e| panic!("bad JSON form `{rest}`: {e}"))
    } else {
        rest.split_whitespace().map(str::to_string).collect()
    };
    (flags, words)
}

/// KEY=VALUE pairs of an ENV instruction (also the legacy `ENV KEY value` form).
fn env_pairs(args: &str) -> Vec<(String, String)> {
    let unquote = |s: &str| s.trim_matches('"').trim_matches('\'').to_string();
    let words: Vec<&str> = args.split_whitespace().collect();
    match words.first() {
        Some(first) if !first.contains('=') => {
            vec![(first.to_string(), unquote(&words[1..].join(" ")))]
        }
        _ => words
            .iter()
            .filter_map(|w| w.split_once('='))
            .map(|(k, v)| (k.to_string(), unquote(v)))
            .collect(),
    }
}

/// Patterns from .dockerignore without wildcards or exceptions, normalised (no leading or
/// trailing slash).
fn dockerignore_plain_patterns() -> Vec<String> {
    read(".dockerignore")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with('!'))
        .filter(|l| !l.contains(['*', '?', '[']))
        .map(|l| l.trim_start_matches("./").trim_matches('/').to_string())
        .collect()
}

#[test]
fn dockerfile_copy_sources_exist_and_are_in_the_build_context() {
    let ignored = dockerignore_plain_patterns();
    let mut checked = 0;
    for ins in dockerfile() {
        if ins.keyword != "COPY" && ins.keyword != "ADD" {
            continue;
        }
        let (flags, words) = flags_and_words(&ins.args);
        if flags.iter().any(|f| f.starts_with("--from")) {
            continue;
        }
        assert!(
            words.len() >= 2,
            "{} needs a source and a destination: {}",
            ins.keyword,
            ins.args
        );
        for source in &words[..words.len() - 1] {
            if source.starts_with("<<") || source.contains("://") {
                continue;
            }
            let source = source.trim_start_matches("./").trim_end_matches('/');
            // For a wildcard, check the directory before its first wildcard segment.
            let literal: Vec<&str> = source
                .split('/')
                .take_while(|seg| !seg.contains(['*', '?', '[']))
                .collect();
            let literal = literal.join("/");
            let path = if literal.is_empty() {
                root()
            } else {
                root().join(&literal)
            };
            assert!(
                path.exists(),
                "Dockerfile copies `{source}`, which is not in the repository ({})",
                path.display()
            );
            for pattern in &ignored {
                let excluded = literal == *pattern || literal.starts_with(&format!("{pattern}/"));
                assert!(
                    !excluded,
                    "Dockerfile copies `{source}`, but .dockerignore excludes `{pattern}`"
                );
            }
            checked += 1;
        }
    }
    assert!(checked > 0, "no COPY from the build context found");
}

#[test]
fn dockerignore_keeps_weights_builds_and_git_out() {
    let ignored = dockerignore_plain_patterns();
    for must in ["target", "models", "assets", ".git"] {
        assert!(
            ignored.iter().any(|p| p == must),
            ".dockerignore should exclude {must}/"
        );
    }
}

#[test]
fn dockerfile_builds_and_runs_tokenscope_on_port_8000() {
    let all = dockerfile();
    assert!(
        all.iter()
            .any(|i| i.keyword == "RUN" && i.args.contains("cargo build --release")),
        "no `cargo build --release` in the Dockerfile"
    );
    assert!(
        all.iter()
            .any(|i| i.keyword == "ARG" && i.args.starts_with("FEATURES")),
        "the Dockerfile should take ARG FEATURES (cuda builds)"
    );
    let manifest = read("Cargo.toml");
    assert!(
        manifest.contains(&format!("name = \"{BINARY}\"")),
        "Cargo.toml's package is no longer named {BINARY}"
    );
    assert!(
        !manifest.contains("[[bench]]") || root().join("benches").exists(),
        "benches/ must exist when Cargo.toml declares a [[bench]]"
    );

    let stage = final_stage(&all);
    let port = PORT.to_string();
    let port_tcp = format!("{PORT}/tcp");
    assert!(
        stage
            .iter()
            .filter(|i| i.keyword == "EXPOSE")
            .flat_map(|i| i.args.split_whitespace())
            .any(|p| p == port || p == port_tcp),
        "the final stage should EXPOSE {PORT}"
    );

    let healthcheck = stage
        .iter()
        .find(|i| i.keyword == "HEALTHCHECK")
        .expect("a HEALTHCHECK in the final stage");
    assert!(
        healthcheck.args.contains("/health"),
        "HEALTHCHECK should probe /health: {}",
        healthcheck.args
    );
    assert!(
        healthcheck.args.contains(&port),
        "HEALTHCHECK should use port {PORT}: {}",
        healthcheck.args
    );

    // The binary copied out of the builder is what ENTRYPOINT runs, and it runs `serve`.
    let binary_dest = stage
        .iter()
        .filter(|i| i.keyword == "COPY")
        .map(|i| flags_and_words(&i.args))
        .filter(|(flags, _)| flags.iter().any(|f| f.starts_with("--from")))
        .filter_map(|(_, words)| words.last().cloned())
        .find(|dest| dest.ends_with(&format!("/{BINARY}")))
        .expect("a COPY --from=<builder> of the tokenscope binary");
    let entrypoint = stage
        .iter()
        .rfind(|i| i.keyword == "ENTRYPOINT")
        .expect("an ENTRYPOINT");
    assert!(
        entrypoint.args.contains(&binary_dest),
        "ENTRYPOINT should run {binary_dest}: {}",
        entrypoint.args
    );
    assert!(
        entrypoint.args.contains("tini"),
        "tini should be PID 1: {}",
        entrypoint.args
    );
    let cmd = stage.iter().rfind(|i| i.keyword == "CMD").expect("a CMD");
    assert!(
        cmd.args.contains("serve"),
        "CMD should be `serve`: {}",
        cmd.args
    );

    let user = stage
        .iter()
        .rfind(|i| i.keyword == "USER")
        .expect("a USER in the final stage");
    let uid = user.args.split(':').next().unwrap_or_default();
    assert!(
        uid != "root" && uid != "0",
        "the image should not run as root: USER {}",
        user.args
    );
}

#[test]
fn dockerfile_env_is_known_and_listens_on_all_interfaces() {
    let all = dockerfile();
    let env: Vec<(String, String)> = final_stage(&all)
        .iter()
        .filter(|i| i.keyword == "ENV")
        .flat_map(|i| env_pairs(&i.args))
        .collect();
    let known = known_env();
    for (name, _) in &env {
        if name.starts_with("TOKENSCOPE_") {
            assert!(
                known.contains(name),
                "Dockerfile sets {name}, which tokenscope does not read"
            );
        }
    }
    let get = |key: &str| env.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str());
    assert_eq!(get("TOKENSCOPE_HOST"), Some("0.0.0.0"));
    if let Some(port) = get("TOKENSCOPE_PORT") {
        assert_eq!(port, PORT.to_string());
    }
    if let Some(model) = get("TOKENSCOPE_MODEL") {
        assert!(
            model.ends_with(DEFAULT_MODEL_FILE),
            "TOKENSCOPE_MODEL in the image should be the default model: {model}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Kubernetes manifests

/// The first document of a YAML file.
fn first_doc(rel: &str) -> Value {
    yaml_docs(rel)
        .into_iter()
        .next()
        .unwrap_or_else(|| panic!("{rel} is empty"))
}

/// Every non-empty document of a YAML file.
fn yaml_docs(rel: &str) -> Vec<Value> {
    let text = read(rel);
    let mut docs = Vec::new();
    for document in serde_yaml::Deserializer::from_str(&text) {
        let value = Value::deserialize(document).unwrap_or_else(|e| panic!("{rel}: {e}"));
        if !value.is_null() {
            docs.push(value);
        }
    }
    docs
}

/// All .yaml/.yml files under deploy/kubernetes, relative to the repository root.
fn manifest_files() -> Vec<String> {
    let mut out = Vec::new();
    let mut dirs = vec![root().join("deploy/kubernetes")];
    while let Some(dir) = dirs.pop() {
        let entries =
            fs::read_dir(&dir).unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()));
        for entry in entries {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                dirs.push(path);
            } else if matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml")
            ) {
                let rel = path.strip_prefix(root()).expect("under the repository");
                out.push(rel.to_string_lossy().into_owned());
            }
        }
    }
    out.sort();
    assert!(!out.is_empty(), "no manifests under deploy/kubernetes");
    out
}

fn find_kind(docs: &[Value], kind: &str) -> Value {
    docs.iter()
        .find(|d| d["kind"].as_str() == Some(kind))
        .cloned()
        .unwrap_or_else(|| panic!("no {kind} document"))
}

fn base_deployment() -> Value {
    find_kind(&yaml_docs(&format!("{BASE}/deployment.yaml")), "Deployment")
}

fn tokenscope_container(deployment: &Value) -> Value {
    deployment["spec"]["template"]["spec"]["containers"]
        .as_sequence()
        .expect("spec.template.spec.containers")
        .iter()
        .find(|c| c["name"].as_str() == Some(BINARY))
        .cloned()
        .expect("a container named tokenscope")
}

/// Whether a probe/Service port (a number, or a container port's name) means port 8000.
fn is_service_port(port: &Value, container: &Value) -> bool {
    if let Some(number) = port.as_u64() {
        return number == PORT;
    }
    let Some(name) = port.as_str() else {
        return false;
    };
    container["ports"].as_sequence().is_some_and(|ports| {
        ports
            .iter()
            .any(|p| p["name"].as_str() == Some(name) && p["containerPort"].as_u64() == Some(PORT))
    })
}

/// (name, literal value) of every `env:` entry anywhere in a document.
fn collect_env(value: &Value, out: &mut Vec<(String, Option<String>)>) {
    match value {
        Value::Mapping(map) => {
            for (key, child) in map {
                if key.as_str() == Some("env") {
                    for item in child.as_sequence().into_iter().flatten() {
                        let name = item["name"].as_str().expect("env entries have a name");
                        let literal = item["value"].as_str().map(str::to_string);
                        out.push((name.to_string(), literal));
                    }
                }
                collect_env(child, out);
            }
        }
        Value::Sequence(items) => {
            for item in items {
                collect_env(item, out);
            }
        }
        _ => {}
    }
}

/// `registry/name:tag` → `registry/name` (a registry's `:port` is kept).
fn image_repository(image: &str) -> &str {
    let image = image.split('@').next().unwrap_or(image);
    let slash = image.rfind('/').unwrap_or(0);
    match image.rfind(':') {
        Some(colon) if colon > slash => &image[..colon],
        _ => image,
    }
}

#[test]
fn every_manifest_parses() {
    for file in manifest_files() {
        let docs = yaml_docs(&file);
        assert!(!docs.is_empty(), "{file} has no YAML document");
        for doc in &docs {
            let is_kustomization = file.ends_with("kustomization.yaml");
            assert!(
                is_kustomization || doc["apiVersion"].as_str().is_some(),
                "{file}: a document without apiVersion"
            );
            assert!(
                doc["kind"].as_str().is_some(),
                "{file}: a document without kind"
            );
        }
    }
}

#[test]
fn deployment_serves_port_8000_with_health_and_live_probes() {
    let deployment = base_deployment();
    let container = tokenscope_container(&deployment);
    let ports = container["ports"].as_sequence().expect("container ports");
    assert!(
        ports
            .iter()
            .any(|p| p["containerPort"].as_u64() == Some(PORT)),
        "the container should declare containerPort {PORT}"
    );

    for (probe, path) in [
        ("readinessProbe", "/health"),
        ("livenessProbe", "/live"),
        ("startupProbe", "/health"),
    ] {
        let get = &container[probe]["httpGet"];
        assert_eq!(get["path"].as_str(), Some(path), "{probe} path");
        assert!(
            is_service_port(&get["port"], &container),
            "{probe} should use port {PORT}: {:?}",
            get["port"]
        );
    }

    let template = &deployment["spec"]["template"];
    let annotations = &template["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/path"].as_str(), Some("/metrics"));
    assert_eq!(
        annotations["prometheus.io/port"].as_str(),
        Some(PORT.to_string().as_str())
    );
    // A Service named "tokenscope" would otherwise inject TOKENSCOPE_PORT=tcp://... into the pod.
    assert_eq!(
        template["spec"]["enableServiceLinks"].as_bool(),
        Some(false),
        "enableServiceLinks must be false (service links set TOKENSCOPE_PORT=tcp://...)"
    );
    assert_eq!(
        template["spec"]["securityContext"]["runAsNonRoot"].as_bool(),
        Some(true)
    );
    assert!(
        template["spec"]["terminationGracePeriodSeconds"]
            .as_u64()
            .is_some(),
        "set terminationGracePeriodSeconds for the graceful drain"
    );
}

#[test]
fn service_targets_port_8000_of_the_deployment_pods() {
    let deployment = base_deployment();
    let container = tokenscope_container(&deployment);
    let service = find_kind(&yaml_docs(&format!("{BASE}/service.yaml")), "Service");
    let ports = service["spec"]["ports"]
        .as_sequence()
        .expect("service ports");
    assert!(
        ports
            .iter()
            .any(|p| p["name"].as_str() == Some("http")
                && is_service_port(&p["targetPort"], &container)),
        "the Service should have a port named http targeting {PORT}"
    );

    let selector = service["spec"]["selector"]
        .as_mapping()
        .expect("service selector");
    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    for (key, value) in selector {
        let key = key.as_str().expect("a label key");
        assert_eq!(
            &labels[key], value,
            "the Service selector {key} does not match the pod labels"
        );
    }
}

#[test]
fn autoscalers_target_the_deployment() {
    let name = base_deployment()["metadata"]["name"]
        .as_str()
        .expect("deployment name")
        .to_string();
    for file in manifest_files() {
        for doc in yaml_docs(&file) {
            if doc["kind"].as_str() != Some("HorizontalPodAutoscaler") {
                continue;
            }
            let target = &doc["spec"]["scaleTargetRef"];
            if target.is_null() {
                continue; // a patch (overlays) only changes replica bounds
            }
            assert_eq!(target["kind"].as_str(), Some("Deployment"), "{file}");
            assert_eq!(target["name"].as_str(), Some(name.as_str()), "{file}");
        }
    }
}

#[test]
fn manifest_env_vars_are_ones_tokenscope_reads() {
    let mut env = Vec::new();
    for file in manifest_files() {
        for doc in yaml_docs(&file) {
            collect_env(&doc, &mut env);
        }
    }
    assert!(!env.is_empty(), "no env in the manifests");
    let known = known_env();
    for (name, value) in &env {
        assert!(
            known.contains(name) || name.starts_with("HF_"),
            "manifests set {name}, which tokenscope does not read"
        );
        let Some(value) = value else { continue };
        let value = value.as_str();
        match name.as_str() {
            "TOKENSCOPE_HOST" => assert_eq!(value, "0.0.0.0"),
            "TOKENSCOPE_PORT" => assert_eq!(value, PORT.to_string()),
            "TOKENSCOPE_DEVICE" => assert!(
                matches!(value, "auto" | "cpu" | "cuda") || value.starts_with("cuda:"),
                "TOKENSCOPE_DEVICE={value}"
            ),
            "TOKENSCOPE_DTYPE" => assert!(
                matches!(value, "auto" | "f32" | "f16" | "bf16" | "gguf"),
                "TOKENSCOPE_DTYPE={value}"
            ),
            "TOKENSCOPE_LOG_FORMAT" => assert!(
                matches!(value, "text" | "json"),
                "TOKENSCOPE_LOG_FORMAT={value}"
            ),
            _ => {}
        }
    }
}

#[test]
fn manifests_agree_with_the_image() {
    let all = dockerfile();
    let image_env: Vec<(String, String)> = final_stage(&all)
        .iter()
        .filter(|i| i.keyword == "ENV")
        .flat_map(|i| env_pairs(&i.args))
        .collect();
    let container = tokenscope_container(&base_deployment());
    let mut env = Vec::new();
    collect_env(&container, &mut env);
    let model_in_image = image_env
        .iter()
        .find(|(k, _)| k == "TOKENSCOPE_MODEL")
        .map(|(_, v)| v.as_str());
    let model_in_deployment = env
        .iter()
        .find(|(k, _)| k == "TOKENSCOPE_MODEL")
        .and_then(|(_, v)| v.as_deref());
    if let (Some(image), Some(deployment)) = (model_in_image, model_in_deployment) {
        assert_eq!(
            deployment, image,
            "the Deployment's TOKENSCOPE_MODEL differs from the image's default"
        );
    }

    // The API keys come from the Secret whose shape secret.example.yaml shows.
    let secret = find_kind(&yaml_docs(&format!("{BASE}/secret.example.yaml")), "Secret");
    let keys = container["env"]
        .as_sequence()
        .expect("container env")
        .iter()
        .find(|e| e["name"].as_str() == Some("TOKENSCOPE_API_KEYS"))
        .expect("TOKENSCOPE_API_KEYS in the Deployment");
    let secret_ref = &keys["valueFrom"]["secretKeyRef"];
    assert_eq!(secret_ref["name"], secret["metadata"]["name"]);
    let key = secret_ref["key"].as_str().expect("secretKeyRef.key");
    assert!(
        !secret["stringData"][key].is_null(),
        "secret.example.yaml has no {key}"
    );
}

#[test]
fn gpu_overlay_uses_the_same_image_with_a_cuda_tag() {
    let image = tokenscope_container(&base_deployment())["image"]
        .as_str()
        .expect("container image")
        .to_string();
    let repository = image_repository(&image);
    assert!(
        repository.ends_with(&format!("/{BINARY}")) || repository == BINARY,
        "unexpected image name {image}"
    );

    let base = first_doc(&format!("{BASE}/kustomization.yaml"));
    let gpu = first_doc(&format!("{GPU}/kustomization.yaml"));
    for kustomization in [&base, &gpu] {
        for entry in kustomization["images"].as_sequence().into_iter().flatten() {
            assert_eq!(
                entry["name"].as_str(),
                Some(repository),
                "kustomization images must name the Deployment's image"
            );
            if let Some(new_name) = entry["newName"].as_str() {
                assert!(new_name.ends_with(BINARY), "newName {new_name}");
            }
        }
    }
    let base_tag = base["images"]
        .as_sequence()
        .into_iter()
        .flatten()
        .find_map(|e| e["newTag"].as_str());
    let gpu_tag = gpu["images"]
        .as_sequence()
        .into_iter()
        .flatten()
        .find_map(|e| e["newTag"].as_str())
        .expect("the GPU overlay sets the image tag");
    assert!(gpu_tag.contains("cuda"), "GPU image tag {gpu_tag}");
    assert_ne!(
        Some(gpu_tag),
        base_tag,
        "the GPU overlay needs the CUDA image"
    );

    // Its patch asks for a GPU and the CUDA device.
    let mut gpu_limit = false;
    let mut cuda_device = false;
    for patch in gpu["patches"].as_sequence().expect("GPU overlay patches") {
        let path = patch["path"].as_str().expect("patch path");
        for doc in yaml_docs(&format!("{GPU}/{path}")) {
            for container in doc["spec"]["template"]["spec"]["containers"]
                .as_sequence()
                .into_iter()
                .flatten()
            {
                gpu_limit |= !container["resources"]["limits"]["nvidia.com/gpu"].is_null();
                let mut env = Vec::new();
                collect_env(container, &mut env);
                cuda_device |= env.iter().any(|(name, value)| {
                    name == "TOKENSCOPE_DEVICE" && value.as_deref() == Some("cuda")
                });
            }
        }
    }
    assert!(gpu_limit, "the GPU overlay should limit nvidia.com/gpu");
    assert!(
        cuda_device,
        "the GPU overlay should set TOKENSCOPE_DEVICE=cuda"
    );
}

#[test]
fn kustomizations_reference_existing_files() {
    for file in manifest_files() {
        if !file.ends_with("kustomization.yaml") {
            continue;
        }
        let dir = Path::new(&file).parent().expect("a directory");
        let doc = first_doc(&file);
        let resources = doc["resources"].as_sequence().into_iter().flatten();
        let patches = doc["patches"]
            .as_sequence()
            .into_iter()
            .flatten()
            .map(|p| &p["path"]);
        for reference in resources.chain(patches) {
            let rel = reference.as_str().expect("a path");
            let path = root().join(dir).join(rel);
            assert!(path.exists(), "{file} refers to missing {rel}");
        }
    }
}
