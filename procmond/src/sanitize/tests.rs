//! Unit tests of `sanitize`.

use super::*;
use proptest::prelude::*;

const GHP: &str = "ghp_abcdefghijklmnopqrstuvwxyzABCDEFGHIJ";
const JWT: &str = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl_-x";

fn sanitizer() -> Sanitizer {
    Sanitizer::new(&SanitizeConfig::default())
}

fn argv(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| (*s).to_owned()).collect()
}

fn run(s: &Sanitizer, args: &[&str]) -> Sanitized {
    s.sanitize(&argv(args))
}

/// Input argv, expected argv, expected redaction count.
type Case = (&'static [&'static str], &'static [&'static str], usize);

#[test]
fn a_cut_command_line_has_its_cut_word_masked_whole() {
    let s = sanitizer();
    let cut = |args: &[&str]| s.sanitize_cut(&argv(args));
    // The two leaks found: the start of a URL's password and half a
    // GitHub token, which no rule recognises once cut.
    let out = cut(&["git", "clone", "https://alice:s3c"]);
    assert_eq!((out.args, out.redacted), (argv(&["git", "clone", REDACTED]), 1));
    let out = cut(&["sh", "-c", "echo start; gh auth login --with-token ghp_Z9y8X7w6V5u4T3s2"]);
    assert_eq!(out.args, argv(&["sh", "-c", &format!("echo start; gh auth login --with-token {REDACTED}")]));
    // A value the rules redact anyway is not counted twice.
    let out = cut(&["app", "--password", "hunt"]);
    assert_eq!((out.args, out.redacted), (argv(&["app", "--password", REDACTED]), 1));
    // Trailing whitespace: nothing was cut inside a word.
    assert_eq!(cut(&["a", "b "]).args, argv(&["a", "b "]));
    // Only the program: its last word goes.
    assert_eq!(cut(&["python3 app.py --x=abc"]).args, argv(&[&format!("python3 app.py {REDACTED}")]));
    // Stripped arguments: the cut one is gone already.
    let strip = Sanitizer::new(&SanitizeConfig { strip_all_arguments: true, ..Default::default() });
    assert_eq!(strip.sanitize_cut(&argv(&["app", "ghp_Z9y8"])).args, argv(&["app"]));
    assert!(cut(&[]).args.is_empty());
    // Not cut: unchanged.
    assert_eq!(
        run(&s, &["git", "clone", "https://alice:s3c"]).args,
        argv(&["git", "clone", "https://alice:s3c"])
    );
}

const CASES: &[Case] = &[
    // Harmless short flags and values.
    (&["ssh", "-p", "22", "host"], &["ssh", "-p", "22", "host"], 0),
    (&["sort", "-k", "2", "file"], &["sort", "-k", "2", "file"], 0),
    (&["tar", "-xzf", "a.tgz"], &["tar", "-xzf", "a.tgz"], 0),
    (&["grep", "-r", "pass", "."], &["grep", "-r", "pass", "."], 0),
    (&["grep", "-ri", "password", "/etc"], &["grep", "-ri", "password", "/etc"], 0),
    (&["app", "-p", "secret"], &["app", "-p", "secret"], 0),
    (&["app", "--p", "secret"], &["app", "--p", "secret"], 0),
    (&["cat", "/etc/passwd"], &["cat", "/etc/passwd"], 0),
    (&["env", "PWD=/home/u", "OLDPWD=/"], &["env", "PWD=/home/u", "OLDPWD=/"], 0),
    // `--flag value`, `--flag=value`, `-flag value`.
    (&["app", "--password", "hunter2"], &["app", "--password", REDACTED], 1),
    (&["app", "--password=hunter2"], &["app", "--password=********"], 1),
    (&["app", "-password", "hunter2", "x"], &["app", "-password", REDACTED, "x"], 1),
    (&["app", "--api-key", "k1"], &["app", "--api-key", REDACTED], 1),
    (&["app", "--api_key=k1"], &["app", "--api_key=********"], 1),
    (&["app", "--apikey", "k1"], &["app", "--apikey", REDACTED], 1),
    (&["app", "--API-KEY", "k1"], &["app", "--API-KEY", REDACTED], 1),
    (&["app", "--apiKey", "k1"], &["app", "--apiKey", REDACTED], 1),
    (&["app", "--db-password", "x"], &["app", "--db-password", REDACTED], 1),
    (&["app", "--client-secret", "s"], &["app", "--client-secret", REDACTED], 1),
    (&["app", "--mysql-pwd", "x"], &["app", "--mysql-pwd", REDACTED], 1),
    (
        &["app", "--stripetoken", "t", "--credentials", "c"],
        &["app", "--stripetoken", REDACTED, "--credentials", REDACTED],
        2,
    ),
    (
        &["app", "--auth-token=a", "--access_token", "b"],
        &["app", "--auth-token=********", "--access_token", REDACTED],
        2,
    ),
    (&["app", "--token", "t", "--token=u"], &["app", "--token", REDACTED, "--token=********"], 2),
    (&["app", "--passphrase", "open sesame"], &["app", "--passphrase", REDACTED], 1),
    (&["app", "--password=two words"], &["app", "--password=********"], 1),
    (
        &["java", "-Djavax.net.ssl.keyStorePassword=changeit", "-jar", "app.jar"],
        &["java", "-Djavax.net.ssl.keyStorePassword=********", "-jar", "app.jar"],
        1,
    ),
    // Names that do not end with a word, negations, edges of values.
    (&["app", "--secretariat-mode", "fast"], &["app", "--secretariat-mode", "fast"], 0),
    (&["app", "--password-file", "/run/secrets/pw"], &["app", "--password-file", "/run/secrets/pw"], 0),
    (
        &["docker", "login", "--password-stdin", "-u", "bob"],
        &["docker", "login", "--password-stdin", "-u", "bob"],
        0,
    ),
    (&["pg_dump", "--no-password", "-h", "db", "mydb"], &["pg_dump", "--no-password", "-h", "db", "mydb"], 0),
    (
        &["app", "--token-ttl", "3600", "--max-tokens", "100"],
        &["app", "--token-ttl", "3600", "--max-tokens", "100"],
        0,
    ),
    (&["app", "--password"], &["app", "--password"], 0),
    (&["app", "--password", "--verbose"], &["app", "--password", "--verbose"], 0),
    (&["app", "--password", "-dash-start"], &["app", "--password", REDACTED], 1),
    (&["app", "--password=", "x"], &["app", "--password=", "x"], 0),
    (&["app", "=", "--=x", "://@", "", "-", "--"], &["app", "=", "--=x", "://@", "", "-", "--"], 0),
    (&["app", "--user=bob", "--email=bob@example.com"], &["app", "--user=bob", "--email=bob@example.com"], 0),
    // Env-style KEY=value.
    (
        &["env", "AWS_SECRET_ACCESS_KEY=abc", "aws", "s3", "ls"],
        &["env", "AWS_SECRET_ACCESS_KEY=********", "aws", "s3", "ls"],
        1,
    ),
    (
        &["env", "MYSQL_PWD=x", "API_KEY=k", "mysql"],
        &["env", "MYSQL_PWD=********", "API_KEY=********", "mysql"],
        2,
    ),
    (
        &["docker", "run", "-e", "DB_PASSWORD=pw", "-p", "5432:5432", "postgres"],
        &["docker", "run", "-e", "DB_PASSWORD=********", "-p", "5432:5432", "postgres"],
        1,
    ),
    (
        &["kubectl", "create", "secret", "generic", "s", "--from-literal=password=pw"],
        &["kubectl", "create", "secret", "generic", "s", "--from-literal=password=********"],
        1,
    ),
    // URL userinfo and query strings.
    (&["psql", "postgres://app:s3cr3t@db/x"], &["psql", "postgres://app:********@db/x"], 1),
    (
        &["git", "clone", "https://user@github.com/o/r.git"],
        &["git", "clone", "https://user@github.com/o/r.git"],
        0,
    ),
    (&["app", "--url=redis://:pw@cache:6379/0"], &["app", "--url=redis://:********@cache:6379/0"], 1),
    (
        &["app", "DATABASE_URL=mysql://u:p@ss@h:3306/d"],
        &["app", "DATABASE_URL=mysql://u:********@h:3306/d"],
        1,
    ),
    (&["curl", "https://api/x?token=abc&page=2"], &["curl", "https://api/x?token=********&page=2"], 1),
    // Token shapes.
    (&["aws", "--key", "AKIAIOSFODNN7EXAMPLE"], &["aws", "--key", REDACTED], 1),
    (&["app", "id=ASIAABCDEFGHIJKLMNOP"], &["app", "id=********"], 1),
    (&["app", "AKIASHORT", "AKIAIOSFODNN7EXAMPLEX"], &["app", "AKIASHORT", "AKIAIOSFODNN7EXAMPLEX"], 0),
    (&["gh", "--auth", "ghp_abcdefghijklmnopqrstuvwxyzABCDEFGHIJ"], &["gh", "--auth", REDACTED], 1),
    (
        &["git", "clone", "https://ghp_abcdefghijklmnopqrstuvwxyzABCDEFGHIJ@github.com/o/r"],
        &["git", "clone", "https://********@github.com/o/r"],
        1,
    ),
    (&["app", "github_pat_11ABCDEFG0123456789_abcdefghijklmnop"], &["app", REDACTED], 1),
    (
        &["app", "--header-value", "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl_-x"],
        &["app", "--header-value", REDACTED],
        1,
    ),
    (&["app", "eyJnotajwt", "eyJ.a.b"], &["app", "eyJnotajwt", "eyJ.a.b"], 0),
    (&["bot", "--slack=xoxb-1234567890-abcdefghij"], &["bot", "--slack=********"], 1),
    (
        &["app", "--key-data=-----BEGIN RSA PRIVATE KEY-----\nMIIEow\n-----END RSA PRIVATE KEY-----"],
        &["app", "--key-data=********"],
        1,
    ),
    (
        &["app", "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----"],
        &["app", "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----"],
        0,
    ),
    // Headers and JSON.
    (
        &["curl", "-H", "Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2ln"],
        &["curl", "-H", "Authorization: ********"],
        1,
    ),
    (
        &["curl", "-H", "X-Api-Key: k1", "-H", "Content-Type: application/json"],
        &["curl", "-H", "X-Api-Key: ********", "-H", "Content-Type: application/json"],
        1,
    ),
    (
        &["curl", "-d", "{\"user\":\"bob\",\"password\":\"p\\\"w\"}"],
        &["curl", "-d", "{\"user\":\"bob\",\"password\":\"********\"}"],
        1,
    ),
    (
        &["curl", "-d", "{\"api_key\": \"k 1\", \"n\": 2}"],
        &["curl", "-d", "{\"api_key\": \"********\", \"n\": 2}"],
        1,
    ),
    // Program rules.
    (&["mysql", "-uroot", "-pS3cret", "db"], &["mysql", "-uroot", "-p********", "db"], 1),
    (&["mysql", "-p", "db"], &["mysql", "-p", "db"], 0),
    (&["/usr/bin/mysqldump", "--password=x", "db"], &["/usr/bin/mysqldump", "--password=********", "db"], 1),
    (&["sudo", "mysql", "-pmy pass"], &["sudo", "mysql", "-p********"], 1),
    (
        &["sshpass", "-p", "pw", "ssh", "-p", "22", "host"],
        &["sshpass", "-p", REDACTED, "ssh", "-p", "22", "host"],
        1,
    ),
    (
        &["redis-cli", "-h", "cache", "-a", "pw", "ping"],
        &["redis-cli", "-h", "cache", "-a", REDACTED, "ping"],
        1,
    ),
    (&["curl", "-u", "admin:pw", "https://x"], &["curl", "-u", "admin:********", "https://x"], 1),
    (
        &["curl", "-uadmin:pw", "-u", "bob", "https://x"],
        &["curl", "-uadmin:********", "-u", "bob", "https://x"],
        1,
    ),
    (
        &["openssl", "enc", "-aes256", "-pass", "pass:pw", "-in", "f"],
        &["openssl", "enc", "-aes256", "-pass", "pass:********", "-in", "f"],
        1,
    ),
    (&["openssl", "rsa", "-passin", "env:KEYPW"], &["openssl", "rsa", "-passin", "env:KEYPW"], 0),
    // Whitespace: nested command lines and rewritten argv[0].
    (
        &["sh", "-c", "PGPASSWORD=pw psql -h db --password hunter2 app"],
        &["sh", "-c", "PGPASSWORD=******** psql -h db --password ******** app"],
        2,
    ),
    (&["sh", "-c", "mysql -uroot -ppw  db\tx"], &["sh", "-c", "mysql -uroot -p********  db\tx"], 1),
    (&["python app.py --api-key k1"], &["python app.py --api-key ********"], 1),
    (&["postgres: app db 10.0.0.1(5432) idle"], &["postgres: app db 10.0.0.1(5432) idle"], 0),
    (
        &["psql", "host=db user=app password=pw dbname=x"],
        &["psql", "host=db user=app password=******** dbname=x"],
        1,
    ),
    // Non-ASCII.
    (&["app", "--пароль", "x", "--password=пароль"], &["app", "--пароль", "x", "--password=********"], 1),
    (&["app", "héllo=wörld", "ünï://ü:ö@ç/é"], &["app", "héllo=wörld", "ünï://ü:********@ç/é"], 1),
    (&["app", "--Pässword", "x"], &["app", "--Pässword", "x"], 0),
];

#[test]
fn table() {
    assert!(CASES.len() >= 45, "{} cases", CASES.len());
    let s = sanitizer();
    for (input, expected, count) in CASES {
        let out = run(&s, input);
        assert_eq!(out.args, argv(expected), "input {input:?}");
        assert_eq!(out.redacted, *count, "count for {input:?}");
    }
}

#[test]
fn token_constants_are_redacted() {
    let s = sanitizer();
    for token in [GHP, JWT] {
        assert_eq!(run(&s, &["app", token]).args, ["app", REDACTED]);
        let arg = format!("--x={token}");
        let out = run(&s, &["app", arg.as_str()]);
        assert_eq!(out.args, ["app", "--x=********"]);
    }
}

#[test]
fn empty_argv() {
    let out = sanitizer().sanitize(&[]);
    assert_eq!(out, Sanitized { args: vec![], redacted: 0 });
    let strip = Sanitizer::new(&SanitizeConfig { strip_all_arguments: true, ..SanitizeConfig::default() });
    assert_eq!(strip.sanitize(&[]), Sanitized { args: vec![], redacted: 0 });
}

#[test]
fn strip_all_arguments() {
    let s = Sanitizer::new(&SanitizeConfig { strip_all_arguments: true, ..SanitizeConfig::default() });
    assert_eq!(run(&s, &["app", "--x", "y"]), Sanitized { args: argv(&["app"]), redacted: 2 });
    assert_eq!(run(&s, &["/bin/app"]), Sanitized { args: argv(&["/bin/app"]), redacted: 0 });
    assert_eq!(run(&s, &["app", ""]), Sanitized { args: argv(&["app"]), redacted: 1 });
    // A rewritten argv[0] is still sanitized.
    assert_eq!(
        run(&s, &["app --token t", "x"]),
        Sanitized { args: argv(&["app --token ********"]), redacted: 2 }
    );
}

#[test]
fn extra_words_extend_defaults() {
    let s =
        Sanitizer::new(&SanitizeConfig { extra_words: vec!["db-pass".into()], ..SanitizeConfig::default() });
    assert_eq!(run(&s, &["app", "--db_pass", "x"]).args, ["app", "--db_pass", REDACTED]);
    assert_eq!(run(&s, &["app", "DB-PASS=x"]).args, ["app", "DB-PASS=********"]);
    assert_eq!(run(&s, &["app", "--main-dbpass=x"]).args, ["app", "--main-dbpass=********"]);
    assert_eq!(run(&s, &["app", "--password", "x"]).args, ["app", "--password", REDACTED]);
    assert_eq!(run(&s, &["app", "--bypass", "x"]).args, ["app", "--bypass", "x"]);
}

#[test]
fn replace_default_words() {
    let cfg = SanitizeConfig {
        extra_words: vec!["PIN".into()],
        replace_default_words: true,
        ..SanitizeConfig::default()
    };
    let s = Sanitizer::new(&cfg);
    assert_eq!(run(&s, &["app", "--password", "x"]).args, ["app", "--password", "x"]);
    assert_eq!(run(&s, &["app", "--pin", "1234"]).args, ["app", "--pin", REDACTED]);
    assert_eq!(
        run(&s, &["app", "--user-pin=1", "USER_PIN=2"]).args,
        ["app", "--user-pin=********", "USER_PIN=********"]
    );
    // Shapes, URLs and program rules do not depend on the words.
    assert_eq!(run(&s, &["app", "AKIAIOSFODNN7EXAMPLE"]).args, ["app", REDACTED]);
    assert_eq!(run(&s, &["app", "http://u:p@h/"]).args, ["app", "http://u:********@h/"]);
    assert_eq!(run(&s, &["mysql", "-pX"]).args, ["mysql", "-p********"]);
    let none = Sanitizer::new(&SanitizeConfig { replace_default_words: true, ..SanitizeConfig::default() });
    assert_eq!(run(&none, &["app", "--password", "x"]).redacted, 0);
}

#[test]
fn empty_words_are_ignored() {
    let cfg = SanitizeConfig {
        extra_words: vec!["-".into(), "_".into(), String::new(), "-_-".into()],
        ..SanitizeConfig::default()
    };
    let s = Sanitizer::new(&cfg);
    assert_eq!(run(&s, &["app", "--mode", "fast", "A=b"]).args, ["app", "--mode", "fast", "A=b"]);
}

#[test]
fn normalization() {
    assert_eq!(normalize("--Api_KEY"), "apikey");
    assert_eq!(normalize("MYSQL_PWD"), "mysqlpwd");
    let s = sanitizer();
    for name in [
        "--api-key",
        "--api_key",
        "--apikey",
        "--API_KEY",
        "--Api-Key",
        "--api--key",
        "-api_key",
        "--x-api-key",
    ] {
        assert!(s.matches(name), "{name}");
        assert_eq!(run(&s, &["app", name, "v"]).args, ["app", name, REDACTED], "{name}");
    }
    for key in ["API_KEY", "api-key", "ApiKey", "MY_API_KEY"] {
        let arg = format!("{key}=v");
        assert_eq!(run(&s, &["env", arg.as_str()]).args, ["env".to_owned(), format!("{key}={REDACTED}")]);
    }
    for name in ["--secretariat-mode", "--api-key-file", "--keys", "-k", "p", ""] {
        assert!(!s.matches(name), "{name}");
    }
    assert!(is_negation("--no-password") && is_negation("no_token"));
    assert!(!is_negation("--nonce") && !is_negation("--no") && !is_negation("--password"));
}

#[test]
fn weird_inputs_do_not_panic() {
    let s = sanitizer();
    let weird = [
        "",
        "=",
        "==",
        "--=",
        "--=x",
        "-=",
        "://",
        "://@",
        ":@",
        "@://:",
        "a://:@",
        "\"",
        "\":",
        "\"\":\"",
        "{\"password\":\"",
        "{\"password\":\"a\\",
        "-----BEGIN ",
        "-----BEGIN PRIVATE KEY-----",
        "-----BEGIN PRIVATE KEY-----x-----END ",
        "eyJ",
        "eyJaaaaaaaaaaaaa.",
        "eyJaaaaaaaaaaaaa.bbbb",
        "xoxb-",
        "ghp_",
        "github_pat_",
        "AKIA",
        "é=é",
        "--é=é",
        "Authorization:",
        "Authorization: ",
        "-p",
        "-pé",
        "pass:",
        "pass:é",
        "-u",
        "-ué:",
        "\u{0}",
        "\u{10FFFF}",
        " ",
        "\t\n",
        "--password ",
    ];
    for program in ["app", "mysql", "curl", "openssl", "sshpass", "redis-cli", ""] {
        for a in weird {
            for b in weird {
                let out = run(&s, &[program, a, b]);
                assert_eq!(out.args.len(), 3);
            }
        }
    }
}

#[test]
fn large_adversarial_arguments_are_linear() {
    let s = sanitizer();
    let size = 128 * 1024;
    let patterns = [
        "a",
        "=",
        "a=",
        "password=",
        "--",
        "eyJ-",
        "eyJaaaaaaaaaa.",
        "xoxb-",
        "ghp_",
        "github_pat_",
        "://",
        "://a:",
        "@",
        "\"\":",
        "\"password\":\"",
        "-----BEGIN ",
        "-----BEGIN PRIVATE KEY-----",
        "AKIA",
        "é",
        " ",
        "a b=",
        " --password ",
    ];
    let start = std::time::Instant::now();
    for p in patterns {
        let big = p.repeat(size / p.len() + 1);
        let out = run(&s, &["app", big.as_str(), "--x", big.as_str()]);
        assert_eq!(out.args.len(), 4);
        let arg = format!("--password={big}");
        let out = run(&s, &["app", arg.as_str()]);
        assert_eq!(out.args, ["app", "--password=********"]);
    }
    // A quadratic scan of 128 KiB takes minutes; linear ones take well
    // under a second each, even unoptimized.
    assert!(start.elapsed() < std::time::Duration::from_secs(60), "{:?}", start.elapsed());
}

/// Pieces that exercise every rule, concatenated into arguments.
fn fragment() -> impl Strategy<Value = String> {
    let pieces = prop::sample::select(vec![
        "--",
        "-",
        "=",
        "password",
        "api_key",
        "token",
        "://",
        "@",
        ":",
        "/",
        "eyJ",
        "eyJhbGciOiJIUzI1NiJ9.",
        "AKIA",
        "IOSFODNN7EXAMPLE",
        "ghp_",
        "xoxb-",
        "-----BEGIN ",
        "PRIVATE KEY-----",
        "-----END ",
        "\"",
        "{",
        "}",
        " ",
        "\t",
        "é",
        "ü",
        "日本",
        "mysql",
        "curl",
        "-p",
        "-u",
        "pass:",
        "Authorization",
        "&",
        ",",
        "\\",
        "a",
        "1",
        "",
    ]);
    prop::collection::vec(pieces, 0..8).prop_map(|v| v.concat())
}

fn argument() -> impl Strategy<Value = String> {
    prop_oneof![fragment(), any::<String>()]
}

proptest! {
    #[test]
    fn never_panics_nor_grows(args in prop::collection::vec(argument(), 0..8), strip in any::<bool>()) {
        let cfg = SanitizeConfig { strip_all_arguments: strip, ..SanitizeConfig::default() };
        let out = Sanitizer::new(&cfg).sanitize(&args);
        prop_assert!(out.args.len() <= args.len());
        if strip {
            prop_assert_eq!(out.args.len(), args.len().min(1));
        } else {
            prop_assert_eq!(out.args.len(), args.len());
        }
    }

    #[test]
    fn password_value_never_survives(
        before in prop::collection::vec(fragment(), 0..5),
        after in prop::collection::vec(fragment(), 0..5),
        tail in any::<String>(),
    ) {
        // The fragments never contain `Q`, so the value is unique.
        let secret = format!("QX9{tail}");
        let mut args = vec!["app".to_owned()];
        args.extend(before);
        let index = args.len();
        args.push(format!("--password={secret}"));
        args.extend(after);
        let out = sanitizer().sanitize(&args);
        prop_assert_eq!(&out.args[index], "--password=********");
        prop_assert!(out.redacted >= 1);
        prop_assert!(!out.args.iter().any(|a| a.contains(&secret)));
    }
}
