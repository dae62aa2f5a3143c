//! The sandbox channels' keys and secrets (the "Keys" part of the module docs): which each
//! kind has, generated once into private files, then read back and checked.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::{io_error, ChannelDef, SandboxError, LOG_TARGET};
use crate::channels::keys::{RsaPrivateKey, RsaPublicKey};
use crate::channels::ChannelKind;

/// The WeChat Pay APIv3 key is exactly 32 bytes; the HMAC secrets both sides accept are at
/// least 16; ours are 64 hex characters (256 random bits).
const APIV3_KEY_BYTES: usize = 32;
const MIN_SUPPLIER_SECRET_BYTES: usize = 16;
const SUPPLIER_SECRET_RANDOM_BYTES: usize = 32;
/// The largest key, secret or earlier manifest read back.
const MAX_FILE_BYTES: u64 = 256 * 1024;

/// Which side of a channel holds a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    /// The gateway (it signs its requests with it).
    Gateway,
    /// The simulated channel (it signs replies and callbacks with it).
    Channel,
}

/// An RSA key pair of a kind: the manifest names of its halves, and who holds it.
struct PairDef {
    private: &'static str,
    public: &'static str,
    side: Side,
}

/// A text secret of a kind (held by both sides; listed under `channel_keys`).
#[derive(Clone, Copy)]
enum TextDef {
    ApiV3Key,
    SupplierSecret,
}

impl TextDef {
    fn name(self) -> &'static str {
        match self {
            TextDef::ApiV3Key => "apiv3_key",
            TextDef::SupplierSecret => "supplier_secret",
        }
    }

    fn generate(self) -> String {
        match self {
            TextDef::ApiV3Key => random_alphanumeric(APIV3_KEY_BYTES),
            TextDef::SupplierSecret => {
                let mut bytes = [0u8; SUPPLIER_SECRET_RANDOM_BYTES];
                getrandom::fill(&mut bytes)
                    .expect("the operating system's random generator failed");
                hex::encode(bytes)
            }
        }
    }

    /// Whether a secret read back is usable (the file's surrounding whitespace trimmed).
    fn check(self, value: &str) -> Result<(), String> {
        match self {
            TextDef::ApiV3Key if value.len() != APIV3_KEY_BYTES => {
                Err(format!("an APIv3 key is exactly {APIV3_KEY_BYTES} bytes"))
            }
            TextDef::SupplierSecret if value.len() < MIN_SUPPLIER_SECRET_BYTES => Err(format!(
                "a supplier secret is at least {MIN_SUPPLIER_SECRET_BYTES} bytes"
            )),
            _ => Ok(()),
        }
    }
}

fn rsa_pairs(kind: ChannelKind) -> &'static [PairDef] {
    match kind {
        ChannelKind::Alipay => &[
            PairDef {
                private: "app_private_key",
                public: "app_public_key",
                side: Side::Gateway,
            },
            PairDef {
                private: "alipay_private_key",
                public: "alipay_public_key",
                side: Side::Channel,
            },
        ],
        ChannelKind::Wechatpay => &[
            PairDef {
                private: "merchant_private_key",
                public: "merchant_public_key",
                side: Side::Gateway,
            },
            PairDef {
                private: "platform_private_key",
                public: "platform_public_key",
                side: Side::Channel,
            },
        ],
        ChannelKind::Supplier => &[],
    }
}

fn text_secrets(kind: ChannelKind) -> &'static [TextDef] {
    match kind {
        ChannelKind::Alipay => &[],
        ChannelKind::Wechatpay => &[TextDef::ApiV3Key],
        ChannelKind::Supplier => &[TextDef::SupplierSecret],
    }
}

/// One channel's key files, by manifest name (absolute paths).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChannelKeys {
    pub gateway_keys: BTreeMap<&'static str, PathBuf>,
    pub channel_keys: BTreeMap<&'static str, PathBuf>,
    /// WeChat Pay: serials derived from the merchant and platform public keys.
    pub merchant_serial: Option<String>,
    pub platform_serial: Option<String>,
}

/// Makes sure every key and secret of `channels` exists under `keys_dir` (an absolute path),
/// generating what is missing; reads back and checks what exists. Blocking (RSA generation
/// takes a good part of a second per key): run it off the async threads.
pub fn ensure_keys(
    keys_dir: &Path,
    channels: &[ChannelDef],
) -> Result<BTreeMap<&'static str, ChannelKeys>, SandboxError> {
    create_private_dir(keys_dir)?;
    let mut missing = Vec::new();
    for def in channels {
        let dir = keys_dir.join(def.id);
        create_private_dir(&dir)?;
        for pair in rsa_pairs(def.kind) {
            let private = dir.join(format!("{}.pem", pair.private));
            if !exists(&private)? {
                missing.push((private, dir.join(format!("{}.pem", pair.public))));
            }
        }
    }
    generate_pairs(&missing)?;

    let mut all = BTreeMap::new();
    for def in channels {
        let dir = keys_dir.join(def.id);
        let mut keys = ChannelKeys::default();
        for pair in rsa_pairs(def.kind) {
            let private = dir.join(format!("{}.pem", pair.private));
            let public = dir.join(format!("{}.pem", pair.public));
            let public_pem = check_pair(&private, &public)?;
            let serial = wechatpay_serial(&public_pem);
            let side = match pair.side {
                Side::Gateway => {
                    keys.merchant_serial = Some(serial);
                    &mut keys.gateway_keys
                }
                Side::Channel => {
                    keys.platform_serial = Some(serial);
                    &mut keys.channel_keys
                }
            };
            side.insert(pair.private, private);
            side.insert(pair.public, public);
        }
        if def.kind != ChannelKind::Wechatpay {
            keys.merchant_serial = None;
            keys.platform_serial = None;
        }
        for text in text_secrets(def.kind) {
            let path = dir.join(format!("{}.txt", text.name()));
            if exists(&path)? {
                let value = read_limited(&path)?;
                text.check(value.trim())
                    .map_err(|message| SandboxError::Key {
                        path: path.clone(),
                        message,
                    })?;
            } else {
                write_private_file(&path, format!("{}\n", text.generate()).as_bytes())?;
            }
            keys.channel_keys.insert(text.name(), path);
        }
        all.insert(def.id, keys);
    }
    Ok(all)
}

/// Generates the missing pairs, one thread each (at most two per channel, so bounded).
fn generate_pairs(missing: &[(PathBuf, PathBuf)]) -> Result<(), SandboxError> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = missing
            .iter()
            .map(|(private, public)| scope.spawn(move || generate_pair(private, public)))
            .collect();
        handles
            .into_iter()
            .map(|handle| handle.join().expect("key generation does not panic"))
            .collect::<Result<Vec<()>, SandboxError>>()
    })?;
    Ok(())
}

fn generate_pair(private: &Path, public: &Path) -> Result<(), SandboxError> {
    let key = RsaPrivateKey::generate_2048().map_err(|e| SandboxError::Key {
        path: private.to_owned(),
        message: e.to_string(),
    })?;
    // The public half first: the private file's presence is what marks the pair as made.
    write_private_file(public, key.public_pem.as_bytes())?;
    write_private_file(private, key.private_pem.expose().as_bytes())?;
    tracing::info!(target: LOG_TARGET, key = %private.display(), "generated a sandbox key");
    Ok(())
}

/// Loads a private key and its public file (written from the private one if missing); they
/// must match. Returns the public key's PEM.
fn check_pair(private: &Path, public: &Path) -> Result<String, SandboxError> {
    let key_error = |path: &Path, message: String| SandboxError::Key {
        path: path.to_owned(),
        message,
    };
    let derived = RsaPrivateKey::from_pem_file(private)
        .map_err(|e| key_error(private, e.to_string()))?
        .public_key()
        .to_pem();
    if !exists(public)? {
        write_private_file(public, derived.as_bytes())?;
        return Ok(derived);
    }
    let stored = RsaPublicKey::from_pem_file(public)
        .map_err(|e| key_error(public, e.to_string()))?
        .to_pem();
    if stored != derived {
        return Err(key_error(
            public,
            format!("is not the public half of {}", private.display()),
        ));
    }
    Ok(derived)
}

/// A WeChat Pay style serial (40 upper-case hex characters) named after the key it belongs
/// to: the first 20 bytes of the SHA-256 of its PEM.
fn wechatpay_serial(public_pem: &str) -> String {
    hex::encode_upper(&Sha256::digest(public_pem.as_bytes())[..20])
}

/// `len` characters of `[A-Za-z0-9]`, uniformly (bytes ≥ 248 are dropped: 248 = 4 × 62).
fn random_alphanumeric(len: usize) -> String {
    const ALPHABET: &[u8; 62] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    const ROUNDS: usize = 64;
    let mut out = String::with_capacity(len);
    let mut bytes = [0u8; 64];
    for _ in 0..ROUNDS {
        getrandom::fill(&mut bytes).expect("the operating system's random generator failed");
        for byte in bytes.iter().filter(|b| **b < 248) {
            if out.len() == len {
                return out;
            }
            out.push(char::from(ALPHABET[usize::from(*byte) % ALPHABET.len()]));
        }
        if out.len() == len {
            return out;
        }
    }
    unreachable!("{ROUNDS} rounds of 64 random bytes give {len} characters");
}

fn exists(path: &Path) -> Result<bool, SandboxError> {
    match fs::metadata(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_error(path)(e)),
    }
}

pub(super) fn read_limited(path: &Path) -> Result<String, SandboxError> {
    let len = fs::metadata(path).map_err(io_error(path))?.len();
    if len > MAX_FILE_BYTES {
        return Err(SandboxError::Key {
            path: path.to_owned(),
            message: format!("is larger than {MAX_FILE_BYTES} bytes"),
        });
    }
    fs::read_to_string(path).map_err(io_error(path))
}

fn create_private_dir(dir: &Path) -> Result<(), SandboxError> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir).map_err(io_error(dir))
}

/// Writes `contents` to `path` (mode 0600) through a temporary file in the same directory,
/// renamed over it: a reader, or the next start after a crash, sees the old file or the new
/// one, never a part.
pub(super) fn write_private_file(path: &Path, contents: &[u8]) -> Result<(), SandboxError> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temporary = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let write = || -> std::io::Result<()> {
        match fs::remove_file(&temporary) {
            Err(e) if e.kind() != ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut options = OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options.open(&temporary)?;
        file.write_all(contents)?;
        file.sync_all()?;
        fs::rename(&temporary, path)?;
        // The rename itself is durable once the directory is synced.
        #[cfg(unix)]
        fs::File::open(dir)?.sync_all()?;
        Ok(())
    };
    write().map_err(|source| {
        let _ = fs::remove_file(&temporary);
        SandboxError::Io {
            path: path.to_owned(),
            source,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::super::{CHANNELS, KEYS_DIR};
    use super::*;

    fn files_under(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
        let mut files = BTreeMap::new();
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                files.extend(files_under(&path));
            } else {
                files.insert(path.clone(), fs::read(&path).unwrap());
            }
        }
        files
    }

    #[test]
    fn keys_are_generated_once_private_to_the_owner_and_then_reused() {
        let dir = tempfile::tempdir().unwrap();
        let keys_dir = dir.path().join(KEYS_DIR);
        // One channel of each kind: four RSA keys, an APIv3 key and a supplier secret.
        let defs = [CHANNELS[0], CHANNELS[2], CHANNELS[3]];
        let first = ensure_keys(&keys_dir, &defs).unwrap();
        let files = files_under(&keys_dir);
        assert_eq!(files.len(), 10, "{:?}", files.keys());

        let alipay = &first["alipay-main"];
        let app = RsaPrivateKey::from_pem_file(&alipay.gateway_keys["app_private_key"]).unwrap();
        let app_public =
            RsaPublicKey::from_pem_file(&alipay.gateway_keys["app_public_key"]).unwrap();
        assert!(app_public.verify_sha256(b"m", &app.sign_sha256(b"m")));
        let channel = RsaPrivateKey::from_pem_file(&alipay.channel_keys["alipay_private_key"])
            .unwrap()
            .public_key();
        assert_ne!(
            channel.to_pem(),
            app_public.to_pem(),
            "each side its own key"
        );
        let wechat = &first["wechatpay-main"];
        let apiv3 = fs::read_to_string(&wechat.channel_keys["apiv3_key"]).unwrap();
        assert_eq!(apiv3.trim().len(), 32);
        assert!(apiv3.trim().bytes().all(|b| b.is_ascii_alphanumeric()));
        for serial in [&wechat.merchant_serial, &wechat.platform_serial] {
            let serial = serial.as_deref().unwrap();
            assert_eq!(serial.len(), 40);
            assert!(serial
                .bytes()
                .all(|b| b.is_ascii_digit() || b.is_ascii_uppercase()));
        }
        assert!(alipay.platform_serial.is_none());
        let secret =
            fs::read_to_string(&first["supplier-main"].channel_keys["supplier_secret"]).unwrap();
        assert!(secret.trim().len() >= 32);
        #[cfg(unix)]
        {
            assert_eq!(mode(&keys_dir), 0o700);
            for path in files.keys() {
                assert_eq!(mode(path), 0o600, "{}", path.display());
            }
        }

        // Later starts reuse every file as it is, and find the same serials.
        let second = ensure_keys(&keys_dir, &defs).unwrap();
        assert_eq!(second, first);
        assert_eq!(files_under(&keys_dir), files);

        // A lost public half is derived again from its private key.
        let public = &wechat.gateway_keys["merchant_public_key"];
        fs::remove_file(public).unwrap();
        ensure_keys(&keys_dir, &defs).unwrap();
        assert_eq!(files_under(&keys_dir), files);

        // A public half that belongs to another key is refused, not replaced.
        fs::copy(&alipay.gateway_keys["app_public_key"], public).unwrap();
        let err = ensure_keys(&keys_dir, &defs).unwrap_err().to_string();
        assert!(err.contains("merchant_public_key.pem"), "{err}");
        assert!(!err.contains("BEGIN"), "no key material in errors: {err}");

        // So is an APIv3 key of the wrong length.
        fs::remove_file(public).unwrap();
        fs::write(&wechat.channel_keys["apiv3_key"], "short\n").unwrap();
        let err = ensure_keys(&keys_dir, &[CHANNELS[2]])
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(err.contains("apiv3_key.txt"), "{err}");
    }

    #[test]
    fn random_secrets_have_their_length_and_alphabet() {
        let a = random_alphanumeric(32);
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|b| b.is_ascii_alphanumeric()));
        assert_ne!(a, random_alphanumeric(32));
        let secret = TextDef::SupplierSecret.generate();
        assert_eq!(secret.len(), 64);
        assert!(TextDef::SupplierSecret.check(&secret).is_ok());
        assert!(TextDef::ApiV3Key
            .check(&TextDef::ApiV3Key.generate())
            .is_ok());
    }
}
