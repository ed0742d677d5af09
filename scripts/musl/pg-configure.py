#!/usr/bin/env python3
"""Configure a PostgreSQL source tree that has no configure script, for musl-gcc.
Base: Debian's configured pg_config.h and Makefile.global of the same major (postgresql-server-dev-NN),
adjusted for musl and for a minimal server (no ICU, OpenSSL, NLS, LLVM, readline, zlib, ...).
Usage: pg-configure.py SRC DEBIAN_INCLUDE_SERVER DEBIAN_PGXS_MAKEFILE_GLOBAL VERSION PREFIX"""
import os, re, shutil, sys

src, deb_inc, deb_mk, version, prefix = sys.argv[1:6]
major, minor = version.split(".")
inc = os.path.join(src, "src/include")

# --- pg_config.h -----------------------------------------------------------------------------
h = open(os.path.join(deb_inc, "pg_config.h")).read()
def undef(name):
    global h
    h = re.sub(rf"^#define {name}( .*)?$", f"/* #undef {name} */", h, flags=re.M)
def define(name, value="1"):
    global h
    h, n = re.subn(rf"^(/\* #undef {name} \*/|#define {name}( .*)?)$", f"#define {name} {value}", h, flags=re.M)
    if n == 0:
        h += f"\n#define {name} {value}\n"
# features this test server is built without
for name in ["USE_ICU", "USE_LIBXML", "USE_LIBXSLT", "USE_LZ4", "USE_ZSTD", "USE_OPENSSL", "USE_SSL",
             "USE_LLVM", "ENABLE_GSS", "ENABLE_SSPI", "USE_LDAP", "USE_PAM", "USE_SYSTEMD", "USE_SELINUX",
             "USE_BONJOUR", "USE_BSD_AUTH", "ENABLE_NLS", "ENABLE_DTRACE", "HAVE_LIBREADLINE",
             "HAVE_READLINE_READLINE_H", "HAVE_READLINE_HISTORY_H", "HAVE_READLINE_H", "HAVE_HISTORY_H",
             "HAVE_EDITLINE_READLINE_H", "HAVE_EDITLINE_HISTORY_H", "HAVE_RL_COMPLETION_MATCHES",
             "HAVE_RL_FILENAME_COMPLETION_FUNCTION", "HAVE_RL_RESET_SCREEN_SIZE", "HAVE_RL_VARIABLE_BIND",
             "HAVE_RL_COMPLETION_SUPPRESS_QUOTE", "HAVE_RL_FILENAME_QUOTE_CHARACTERS",
             "HAVE_RL_FILENAME_QUOTING_FUNCTION", "HAVE_RL_COMPLETION_APPEND_CHARACTER",
             "HAVE_APPEND_HISTORY", "HAVE_HISTORY_TRUNCATE_FILE", "HAVE_LIBZ", "HAVE_LIBSELINUX",
             "HAVE_UUID_E2FS", "HAVE_UUID_UUID_H", "HAVE_UUID_H", "USE_LZ4", "HAVE_LIBLZ4", "HAVE_LIBZSTD",
             "HAVE_LIBXML2", "HAVE_LIBXSLT", "HAVE_LIBCRYPTO", "HAVE_LIBSSL", "HAVE_LIBLDAP", "HAVE_LIBPAM",
             "HAVE_SECURITY_PAM_APPL_H", "HAVE_GSSAPI_GSSAPI_H", "HAVE_GSSAPI_H", "HAVE_GSSAPI_EXT_H",
             "HAVE_GSSAPI_GSSAPI_EXT_H", "HAVE_LDAP_H", "HAVE_WINLDAP_H", "HAVE_LDAP_INITIALIZE",
             "HAVE_CRYPTO_LOCK", "HAVE_OPENSSL_INIT_SSL", "HAVE_SSL_CTX_SET_CERT_CB",
             "HAVE_SSL_CTX_SET_NUM_TICKETS", "HAVE_X509_GET_SIGNATURE_INFO", "HAVE_X509_GET_SIGNATURE_NID",
             "HAVE_BIO_METH_NEW", "HAVE_HMAC_CTX_NEW", "HAVE_HMAC_CTX_FREE", "HAVE_ASN1_STRING_GET0_DATA",
             "HAVE_BIO_GET_DATA", "HAVE_CRYPTO_NUM_LOCKS", "HAVE_SSL_CTX_SET_CIPHERSUITES",
             "HAVE_SYSTEMD", "HAVE_GCC__SYNC_INT64_CAS_UNUSED"]:
    undef(name)
# glibc-only, absent from musl
for name in ["HAVE_EXECINFO_H", "HAVE_BACKTRACE_SYMBOLS", "HAVE_MBSTOWCS_L", "HAVE_WCSTOMBS_L",
             "HAVE_XLOCALE_H", "LOCALE_T_IN_XLOCALE", "WCSTOMBS_L_IN_XLOCALE"]:
    undef(name)
define("STRERROR_R_INT")
# 17.5+ names it PG_C_PRINTF_ATTRIBUTE; earlier sources read PG_PRINTF_ATTRIBUTE
if "PG_C_PRINTF_ATTRIBUTE" in h and int(minor) < 5:
    define("PG_PRINTF_ATTRIBUTE", "gnu_printf")  # musl's strerror_r is the POSIX one (returns int)
define("PG_MAJORVERSION", f'"{major}"'); define("PG_MAJORVERSION_NUM", major)
define("PG_MINORVERSION_NUM", minor)
define("PG_VERSION", f'"{version}"')
define("PG_VERSION_NUM", str(int(major) * 10000 + int(minor)))
define("PACKAGE_VERSION", f'"{version}"')
define("PACKAGE_STRING", f'"PostgreSQL {version}"')
define("PG_VERSION_STR", f'"PostgreSQL {version} (musl) on x86_64-pc-linux-musl, compiled by musl-gcc, 64-bit"')
# macros the source's pg_config.h.in has and the base release renamed (17.5+: HAVE_DECL_X)
want = set(re.findall(r"^#undef (\w+)", open(os.path.join(inc, "pg_config.h.in")).read(), re.M))
have = set(re.findall(r"^#define (\w+)", h, re.M)) | set(re.findall(r"/\* #undef (\w+) \*/", h))
for name in sorted(want - have):
    decl = "HAVE_DECL_" + name[len("HAVE_"):]
    if re.search(rf"^#define {decl} 1$", h, re.M) or name == "HAVE_MEMORY_H":
        define(name)
    else:
        h += f"\n/* #undef {name} */\n"
open(os.path.join(inc, "pg_config.h"), "w").write(h)
for f in ["pg_config_ext.h"]:
    if os.path.exists(os.path.join(deb_inc, f)):
        shutil.copy(os.path.join(deb_inc, f), os.path.join(inc, f))
shutil.copy(os.path.join(inc, "port/linux.h"), os.path.join(inc, "pg_config_os.h"))
shutil.copy(os.path.join(src, "src/makefiles/Makefile.linux"), os.path.join(src, "src/Makefile.port"))
bp = os.path.join(src, "src/backend/port")
shutil.copy(os.path.join(bp, "posix_sema.c"), os.path.join(bp, "pg_sema.c"))
shutil.copy(os.path.join(bp, "sysv_shmem.c"), os.path.join(bp, "pg_shmem.c"))

# --- src/Makefile.global ---------------------------------------------------------------------
mk = open(deb_mk).read().split("\n")
set_ = {
    "vpath_build": "no", "abs_top_builddir": src, "abs_top_srcdir": src,
    "prefix": prefix, "exec_prefix": "${prefix}", "bindir": "${exec_prefix}/bin",
    "datadir": "${datarootdir}/postgresql", "datarootdir": "${prefix}/share",
    "sysconfdir": "${prefix}/etc", "libdir": "${exec_prefix}/lib", "pkglibdir": "$(libdir)/postgresql",
    "includedir": "${prefix}/include", "pkgincludedir": "$(includedir)/postgresql",
    "mandir": "${datarootdir}/man", "docdir": "${datarootdir}/doc/postgresql", "localedir": "${datarootdir}/locale",
    "includedir_server": "$(pkgincludedir)/server",
    "with_icu": "no", "with_perl": "no", "with_python": "no", "with_tcl": "no", "with_ssl": "no",
    "with_readline": "no", "with_selinux": "no", "with_systemd": "no", "with_gssapi": "no", "with_ldap": "no",
    "with_libxml": "no", "with_libxslt": "no", "with_llvm": "no", "with_system_tzdata": "", "with_uuid": "no",
    "with_zlib": "no", "with_lz4": "no", "with_zstd": "no", "enable_nls": "no", "enable_debug": "no",
    "enable_dtrace": "no", "enable_tap_tests": "no", "enable_rpath": "no",
    "ICU_CFLAGS": "", "ICU_LIBS": "", "CC": "musl-gcc", "CPP": "musl-gcc -E",
    "CPPFLAGS": "-D_GNU_SOURCE",
    "CFLAGS": "-std=gnu17 -Wall -Wmissing-prototypes -Wpointer-arith -Wdeclaration-after-statement -Werror=vla -Wendif-labels -Wmissing-format-attribute -Wimplicit-fallthrough=3 -Wcast-function-type -Wshadow=compatible-local -Wformat-security -fno-strict-aliasing -fwrapv -fexcess-precision=standard -Wno-format-truncation -Wno-stringop-truncation -O2",
    "LIBS": "-lm", "LDAP_LIBS_FE": "", "LDAP_LIBS_BE": "", "UUID_LIBS": "", "LLVM_LIBS": "",
    "LDFLAGS": "$(LDFLAGS_INTERNAL) -Wl,--as-needed", "CXX": "false", "STRIP": "strip",
    "PG_SYSROOT": "", "host_tuple": "x86_64-pc-linux-musl", "host_os": "linux-musl",
    "VERSION": version, "MAJORVERSION": major, "VERSION_NUM": str(int(major) * 10000 + int(minor)),
    "PTHREAD_CFLAGS": "-pthread -D_REENTRANT -D_THREAD_SAFE",
}
seen = set()
out = []
for line in mk:
    m = re.match(r"^([A-Za-z_][A-Za-z0-9_]*)(\s*)(:?=|\+=)(.*)$", line)
    if m and m.group(1) in set_ and m.group(3) != "+=" and m.group(1) not in seen:
        # the first assignment is configure's; later ones (LIBS := -lpgcommon -lpgport $(LIBS))
        # are the file's own logic
        name = m.group(1)
        line = f"{name} {m.group(3)} {set_[name]}"
        seen.add(name)
    out.append(line)
# replacement functions the base release has and this source may not (LIBOBJS)
for i, line in enumerate(out):
    if line.startswith("LIBOBJS ="):
        objs = re.findall(r"\$\{LIBOBJDIR\}(\w+)\$U\.o", line)
        keep = [o for o in objs if os.path.exists(os.path.join(src, "src/port", o + ".c"))]
        out[i] = "LIBOBJS = " + " ".join(f"${{LIBOBJDIR}}{o}$U.o" for o in keep)
missing = [k for k in set_ if k not in seen]
out.append("# musl overrides not in the base file")
for k in missing:
    out.append(f"{k} = {set_[k]}")
open(os.path.join(src, "src/Makefile.global"), "w").write("\n".join(out))
print("configured; variables appended:", " ".join(missing))
