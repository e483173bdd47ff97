/* Optional native helpers for the per-entry hot loop (blobchain.layers._speedups).
 *
 * Each function is a byte-for-byte twin of a pure-Python reference that stays the definition:
 *   ustar_header  <- tarheader.encode_header's USTAR fast path (None: "take the Python path")
 *   read_body     <- tarwriter._copy_body for one small file (None on ANY anomaly: the caller
 *                    re-runs the Python path, which raises the precise named error)
 *   lgetxattr     <- os.getxattr(path, name, follow_symlinks=False), but None instead of an
 *                    exception for "no such attribute" (ENODATA, ENOTSUP, EOPNOTSUPP)
 *   scandir       <- snapshot.Snapshot.scandir's listing of an open directory: (name, lstat)
 *                    pairs sorted by raw name bytes, the stat_result built as os.lstat builds
 *                    it (None on any error: the Python listing then runs and raises)
 *   listing       <- the same pairs kept in C (a Listing; items built when Python asks)
 *   listing_at    <- the same for a directory opened beneath a root (Snapshot.listing)
 *   encode_batch  <- baselayer's loop over a listing's common entries (EntryWriter.handle +
 *                    tarwriter.write_entry), stopping at anything else
 *   skip_same     <- changes._walk over the pairs it drops unreported (changes.same_file true),
 *                    and same_file for the directory pair it stops at
 * Nothing here decides anything the Python code does not; tests compare both paths.
 */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE
#include <Python.h>

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/xattr.h>
#include <unistd.h>

#ifndef SYS_openat2
#define SYS_openat2 437
#endif

struct bc_open_how {
    uint64_t flags;
    uint64_t mode;
    uint64_t resolve;
};

#define BC_RESOLVE (0x08 | 0x04 | 0x02) /* BENEATH | NO_SYMLINKS | NO_MAGICLINKS */
#define BC_O_FILE (O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NOCTTY | O_NONBLOCK)
#define BC_O_DIR (O_RDONLY | O_DIRECTORY | O_CLOEXEC)

/* ---- ustar_header ---------------------------------------------------------------------- */

static int
get_ll(PyObject *o, long long *out)
{
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (v == -1 && PyErr_Occurred())
        return -1;
    if (overflow)
        return 0;
    *out = v;
    return 1;
}

static int
is_ascii(const char *s, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == 0 || c >= 0x80)
            return 0;
    }
    return 1;
}

static void
put_octal(char *dst, int digits, unsigned long long v)
{
    /* digits octal digits, zero padded, then NUL (Python's b"%07o\0" for values that fit) */
    for (int i = digits - 1; i >= 0; i--) {
        dst[i] = (char)('0' + (v & 7));
        v >>= 3;
    }
    dst[digits] = 0;
}

static void
fill_block(char *b, const char *name, Py_ssize_t nlen, const char *prefix, Py_ssize_t plen, long long mode,
           long long uid, long long gid, long long size, long long mtime, char tf, const char *link, Py_ssize_t llen,
           long long dmaj, long long dmin)
{
    /* tarheader._BLOCK_FMT filled, then tarheader._finish's checksum */
    memset(b, 0, 512);
    memcpy(b, name, (size_t)nlen);
    put_octal(b + 100, 7, (unsigned long long)mode);
    put_octal(b + 108, 7, (unsigned long long)uid);
    put_octal(b + 116, 7, (unsigned long long)gid);
    put_octal(b + 124, 11, (unsigned long long)size);
    put_octal(b + 136, 11, (unsigned long long)mtime);
    memset(b + 148, ' ', 8);
    b[156] = tf;
    memcpy(b + 157, link, (size_t)llen);
    memcpy(b + 257, "ustar\0" "00", 8);
    put_octal(b + 329, 7, (unsigned long long)dmaj);
    put_octal(b + 337, 7, (unsigned long long)dmin);
    memcpy(b + 345, prefix, (size_t)plen);
    unsigned int sum = 0;
    for (int k = 0; k < 512; k++)
        sum += (unsigned char)b[k];
    put_octal(b + 148, 6, sum); /* "%06o\0 " */
    b[155] = ' ';
}

static int
split_name(const char **name, Py_ssize_t *nlen, const char **prefix, Py_ssize_t *plen)
{
    /* Go splitUSTARPath (tarheader.split_ustar_path) for an ASCII name over 100 bytes; 0: no split */
    const char *nm = *name;
    Py_ssize_t n = *nlen;
    Py_ssize_t length = n;
    if (length > 156)
        length = 156;
    else if (nm[length - 1] == '/')
        length -= 1;
    Py_ssize_t i = -1;
    for (Py_ssize_t k = length - 1; k >= 0; k--) {
        if (nm[k] == '/') {
            i = k;
            break;
        }
    }
    Py_ssize_t rest = n - i - 1;
    if (i <= 0 || rest > 100 || rest == 0 || i > 155)
        return 0;
    *prefix = nm;
    *plen = i;
    *name = nm + i + 1;
    *nlen = rest;
    return 1;
}

static PyObject *
ustar_header(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    /* (name, mode, uid, gid, size, mtime, typeflag, linkname, devmajor, devminor) */
    if (nargs != 10) {
        PyErr_SetString(PyExc_TypeError, "ustar_header takes 10 arguments");
        return NULL;
    }
    PyObject *oname = args[0], *otf = args[6], *olink = args[7];
    if (!PyBytes_CheckExact(oname) || !PyBytes_CheckExact(otf) || !PyBytes_CheckExact(olink))
        Py_RETURN_NONE;
    long long v[7];
    const int argi[7] = {1, 2, 3, 4, 5, 8, 9};
    for (int k = 0; k < 7; k++) {
        if (!PyLong_Check(args[argi[k]]))
            Py_RETURN_NONE;
        int r = get_ll(args[argi[k]], &v[k]);
        if (r < 0)
            return NULL;
        if (r == 0)
            Py_RETURN_NONE;
    }
    long long mode = v[0], uid = v[1], gid = v[2], size = v[3], mtime = v[4], dmaj = v[5], dmin = v[6];
    const long long max7 = 1LL << 21, max11 = 1LL << 33;
    if (mode < 0 || mode >= max7 || uid < 0 || uid >= max7 || gid < 0 || gid >= max7 || size < 0 ||
        size >= max11 || mtime < 0 || mtime >= max11 || dmaj < 0 || dmaj >= max7 || dmin < 0 || dmin >= max7)
        Py_RETURN_NONE;

    const char *name = PyBytes_AS_STRING(oname);
    Py_ssize_t nlen = PyBytes_GET_SIZE(oname);
    const char *link = PyBytes_AS_STRING(olink);
    Py_ssize_t llen = PyBytes_GET_SIZE(olink);
    if (PyBytes_GET_SIZE(otf) != 1 || llen > 100 || !is_ascii(name, nlen) || !is_ascii(link, llen))
        Py_RETURN_NONE;
    char tf = PyBytes_AS_STRING(otf)[0];
    /* _NO_SLASH names may not end in '/'; _RESERVED and NUL go through the Python path */
    if ((tf == '0' || tf == '3' || tf == '4' || tf == '6' || tf == 'S') && nlen > 0 && name[nlen - 1] == '/')
        Py_RETURN_NONE;
    if (tf == 'x' || tf == 'g' || tf == 'L' || tf == 'K' || tf == 0)
        Py_RETURN_NONE;

    const char *prefix = "";
    Py_ssize_t plen = 0;
    if (nlen > 100 && !split_name(&name, &nlen, &prefix, &plen))
        Py_RETURN_NONE;

    PyObject *out = PyBytes_FromStringAndSize(NULL, 512);
    if (out == NULL)
        return NULL;
    fill_block(PyBytes_AS_STRING(out), name, nlen, prefix, plen, mode, uid, gid, size, mtime, tf, link, llen, dmaj, dmin);
    return out;
}

/* ---- read_body ------------------------------------------------------------------------- */

static int
rel_is_plain(const char *rel, Py_ssize_t n)
{
    /* The paths snapshot._check_rel lets through without its slow loop; anything else goes
     * to the Python path, which checks (and raises) exactly as before. */
    if (n == 0 || rel[0] == '/' || rel[n - 1] == '/')
        return 0;
    if (n == 1 && rel[0] == '.')
        return 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        char c = rel[i];
        if (c == 0)
            return 0;
        if (i + 1 < n) {
            char d = rel[i + 1];
            if ((c == '.' && d == '.') || (c == '/' && d == '/') || (c == '.' && d == '/'))
                return 0;
        }
    }
    return 1;
}

static int
open_beneath(int dirfd, const char *rel, uint64_t flags)
{
    struct bc_open_how how = {flags, 0, BC_RESOLVE};
    for (int i = 0; i < 16; i++) {
        long fd = syscall(SYS_openat2, dirfd, rel, &how, sizeof how);
        if (fd >= 0)
            return (int)fd;
        if (errno != EAGAIN && errno != EINTR)
            return -1;
    }
    return -1;
}

static PyObject *
read_body(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    /* (rootfd, rel, size, ino, dev, mtime_ns, header) -> header + body + NUL padding, or None */
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "read_body takes 7 arguments");
        return NULL;
    }
    PyObject *orel = args[1], *ohdr = args[6];
    if (!PyBytes_CheckExact(orel) || !PyBytes_CheckExact(ohdr))
        Py_RETURN_NONE;
    for (int k = 0; k < 6; k++) {
        if (k != 1 && !PyLong_Check(args[k]))
            Py_RETURN_NONE;
    }
    long lrootfd = PyLong_AsLong(args[0]);
    int rootfd = (int)lrootfd;
    long long size = PyLong_AsLongLong(args[2]);
    unsigned long long ino = PyLong_AsUnsignedLongLong(args[3]);
    unsigned long long dev = PyLong_AsUnsignedLongLong(args[4]);
    long long mtime_ns = PyLong_AsLongLong(args[5]);
    if (PyErr_Occurred()) {
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    const char *rel = PyBytes_AS_STRING(orel);
    Py_ssize_t rlen = PyBytes_GET_SIZE(orel);
    if (lrootfd < 0 || lrootfd > 0x7fffffff || size <= 0 || size > (1LL << 30) || !rel_is_plain(rel, rlen))
        Py_RETURN_NONE;

    int fd;
    struct stat before, after;
    int ok = 0;
    Py_BEGIN_ALLOW_THREADS
    fd = open_beneath(rootfd, rel, BC_O_FILE);
    if (fd >= 0) {
        if (fstat(fd, &before) == 0 && S_ISREG(before.st_mode) && (long long)before.st_size == size &&
            (!ino || (unsigned long long)before.st_ino == ino) && (!dev || (unsigned long long)before.st_dev == dev) &&
            (!mtime_ns || (long long)before.st_mtim.tv_sec * 1000000000LL + before.st_mtim.tv_nsec == mtime_ns))
            ok = 1;
        else
            close(fd);
    }
    Py_END_ALLOW_THREADS
    if (!ok)
        Py_RETURN_NONE;

    Py_ssize_t hlen = PyBytes_GET_SIZE(ohdr);
    Py_ssize_t pad = (Py_ssize_t)((512 - (size % 512)) % 512);
    PyObject *out = PyBytes_FromStringAndSize(NULL, hlen + (Py_ssize_t)size + pad);
    if (out == NULL) {
        close(fd);
        return NULL;
    }
    char *buf = PyBytes_AS_STRING(out);
    memcpy(buf, PyBytes_AS_STRING(ohdr), (size_t)hlen);
    memset(buf + hlen + size, 0, (size_t)pad);

    Py_BEGIN_ALLOW_THREADS
    char *p = buf + hlen;
    long long remaining = size;
    while (remaining > 0) {
        ssize_t n = read(fd, p, (size_t)remaining);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        p += n;
        remaining -= n;
    }
    ok = remaining == 0 && fstat(fd, &after) == 0 && after.st_size == before.st_size &&
         after.st_mtim.tv_sec == before.st_mtim.tv_sec && after.st_mtim.tv_nsec == before.st_mtim.tv_nsec &&
         after.st_ctim.tv_sec == before.st_ctim.tv_sec && after.st_ctim.tv_nsec == before.st_ctim.tv_nsec;
    close(fd);
    Py_END_ALLOW_THREADS
    if (!ok) {
        Py_DECREF(out);
        Py_RETURN_NONE;
    }
    return out;
}

/* ---- lgetxattr ------------------------------------------------------------------------- */

static PyObject *
bc_lgetxattr(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyBytes_Check(args[0]) || !PyBytes_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "lgetxattr(path: bytes, name: bytes)");
        return NULL;
    }
    const char *path = PyBytes_AS_STRING(args[0]);
    const char *name = PyBytes_AS_STRING(args[1]);
    if ((Py_ssize_t)strlen(path) != PyBytes_GET_SIZE(args[0]) ||
        (Py_ssize_t)strlen(name) != PyBytes_GET_SIZE(args[1])) {
        PyErr_SetString(PyExc_ValueError, "embedded null byte");
        return NULL;
    }
    char small[256];
    ssize_t n;
    Py_BEGIN_ALLOW_THREADS
    n = lgetxattr(path, name, small, sizeof small);
    Py_END_ALLOW_THREADS
    if (n >= 0)
        return PyBytes_FromStringAndSize(small, n);
    for (;;) {
        int err = errno;
        if (err == ENODATA || err == ENOTSUP || err == EOPNOTSUPP)
            Py_RETURN_NONE;
        if (err != ERANGE) {
            errno = err;
            return PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, args[0]);
        }
        /* larger than the stack buffer: ask the size, then read (retry if it grew meanwhile) */
        ssize_t want;
        Py_BEGIN_ALLOW_THREADS
        want = lgetxattr(path, name, NULL, 0);
        Py_END_ALLOW_THREADS
        if (want < 0)
            continue;
        PyObject *out = PyBytes_FromStringAndSize(NULL, want);
        if (out == NULL)
            return NULL;
        Py_BEGIN_ALLOW_THREADS
        n = lgetxattr(path, name, PyBytes_AS_STRING(out), (size_t)want);
        Py_END_ALLOW_THREADS
        if (n >= 0) {
            if (n != want && _PyBytes_Resize(&out, n) < 0)
                return NULL;
            return out;
        }
        Py_DECREF(out);
    }
}

/* ---- scandir --------------------------------------------------------------------------- */

static PyObject *stat_result_type; /* os.stat_result */

struct bc_dirent {
    char *name;
    struct stat st;
};

static int
cmp_dirent(const void *a, const void *b)
{
    /* strcmp compares as unsigned char: raw byte order, like Python's bytes < bytes */
    return strcmp(((const struct bc_dirent *)a)->name, ((const struct bc_dirent *)b)->name);
}

static PyObject *
long_from_uid(unsigned long v)
{
    /* posixmodule _PyLong_FromUid/_PyLong_FromGid: (uid_t)-1 is -1 */
    if (v == (unsigned long)(uid_t)-1)
        return PyLong_FromLong(-1);
    return PyLong_FromUnsignedLong(v);
}

static int
set_time(PyObject *v, int index, time_t sec, long nsec)
{
    /* posixmodule fill_time: int seconds, float seconds, integer nanoseconds */
    PyObject *s = PyLong_FromLongLong((long long)sec);
    PyObject *f = PyFloat_FromDouble((double)sec + (double)nsec * 1e-9);
    PyObject *billion = PyLong_FromLong(1000000000L);
    PyObject *ns_frac = PyLong_FromLong(nsec);
    PyObject *prod = (s && billion) ? PyNumber_Multiply(s, billion) : NULL;
    PyObject *ns = (prod && ns_frac) ? PyNumber_Add(prod, ns_frac) : NULL;
    Py_XDECREF(billion);
    Py_XDECREF(ns_frac);
    Py_XDECREF(prod);
    if (!s || !f || !ns) {
        Py_XDECREF(s);
        Py_XDECREF(f);
        Py_XDECREF(ns);
        return -1;
    }
    PyStructSequence_SET_ITEM(v, index, s);
    PyStructSequence_SET_ITEM(v, index + 3, f);
    PyStructSequence_SET_ITEM(v, index + 6, ns);
    return 0;
}

static PyObject *
make_stat(const struct stat *st)
{
    PyObject *v = PyStructSequence_New((PyTypeObject *)stat_result_type);
    if (v == NULL)
        return NULL;
    PyStructSequence_SET_ITEM(v, 0, PyLong_FromLong((long)st->st_mode));
    PyStructSequence_SET_ITEM(v, 1, PyLong_FromUnsignedLongLong((unsigned long long)st->st_ino));
    PyStructSequence_SET_ITEM(v, 2, PyLong_FromLongLong((long long)st->st_dev));
    PyStructSequence_SET_ITEM(v, 3, PyLong_FromLong((long)st->st_nlink));
    PyStructSequence_SET_ITEM(v, 4, long_from_uid((unsigned long)st->st_uid));
    PyStructSequence_SET_ITEM(v, 5, long_from_uid((unsigned long)st->st_gid));
    PyStructSequence_SET_ITEM(v, 6, PyLong_FromLongLong((long long)st->st_size));
    PyStructSequence_SET_ITEM(v, 16, PyLong_FromLong((long)st->st_blksize));
    PyStructSequence_SET_ITEM(v, 17, PyLong_FromLong((long)st->st_blocks));
    PyStructSequence_SET_ITEM(v, 18, PyLong_FromLongLong((long long)st->st_rdev));
    if (set_time(v, 7, st->st_atim.tv_sec, st->st_atim.tv_nsec) < 0 ||
        set_time(v, 8, st->st_mtim.tv_sec, st->st_mtim.tv_nsec) < 0 ||
        set_time(v, 9, st->st_ctim.tv_sec, st->st_ctim.tv_nsec) < 0) {
        Py_DECREF(v);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < 19; i++) {
        if (PyStructSequence_GET_ITEM(v, i) == NULL) {
            Py_DECREF(v);
            if (!PyErr_Occurred())
                PyErr_NoMemory();
            return NULL;
        }
    }
    return v;
}

static void
free_dirents(struct bc_dirent *ents, size_t n)
{
    for (size_t i = 0; i < n; i++)
        free(ents[i].name);
    free(ents);
}

/* The entries of an open directory with their lstat, sorted by raw name; called without the
 * GIL. 0 on success (*out owned by the caller), -1 on any error (nothing to free). ``owned``:
 * dirfd was opened for this listing and is closed here in every case (no duplicate, no
 * rewinds: four syscalls fewer per directory); else the caller's descriptor is left as found. */
static int
list_dir(int dirfd, int owned, struct bc_dirent **out, size_t *count)
{
    struct bc_dirent *ents = NULL;
    size_t n = 0, cap = 0;
    int failed = 0;
    int fd = owned ? dirfd : fcntl(dirfd, F_DUPFD_CLOEXEC, 0);
    DIR *d = fd >= 0 ? fdopendir(fd) : NULL;
    if (d == NULL) {
        if (fd >= 0)
            close(fd);
        return -1;
    }
    if (!owned)
        rewinddir(d); /* the duplicate shares the offset: list from the start */
    for (;;) {
        errno = 0;
        struct dirent *e = readdir(d);
        if (e == NULL) {
            failed = errno != 0;
            break;
        }
        const char *nm = e->d_name;
        if (nm[0] == '.' && (nm[1] == 0 || (nm[1] == '.' && nm[2] == 0)))
            continue;
        if (n == cap) {
            size_t ncap = cap ? cap * 2 : 64;
            struct bc_dirent *grown = realloc(ents, ncap * sizeof *ents);
            if (grown == NULL) {
                failed = 1;
                break;
            }
            ents = grown;
            cap = ncap;
        }
        ents[n].name = strdup(nm);
        if (ents[n].name == NULL) {
            failed = 1;
            break;
        }
        if (fstatat(dirfd, nm, &ents[n].st, AT_SYMLINK_NOFOLLOW) != 0) {
            free(ents[n].name);
            failed = 1;
            break;
        }
        n++;
    }
    /* the descriptor's offset is shared with the caller's: leave it at the start, as
     * os.scandir's close does (its open does not rewind, so this matters) */
    if (!owned)
        rewinddir(d);
    closedir(d);
    if (failed) {
        free_dirents(ents, n);
        return -1;
    }
    if (n > 1)
        qsort(ents, n, sizeof *ents, cmp_dirent);
    *out = ents;
    *count = n;
    return 0;
}

static long
check_dirfd(PyObject *arg)
{
    if (stat_result_type == NULL || !PyLong_Check(arg))
        return -1;
    long dirfd = PyLong_AsLong(arg);
    if (dirfd < 0 || dirfd > 0x7fffffff) {
        PyErr_Clear();
        return -1;
    }
    return dirfd;
}

static PyObject *
entry_pair(const struct bc_dirent *e)
{
    PyObject *name = PyBytes_FromString(e->name);
    PyObject *st = name ? make_stat(&e->st) : NULL;
    PyObject *pair = st ? PyTuple_Pack(2, name, st) : NULL;
    Py_XDECREF(name);
    Py_XDECREF(st);
    return pair;
}

/* The sorted listing of the directory fd ``arg`` (scandir and Listing share it); -1 when the
 * answer is None (not a usable fd, or any error listing it). */
static int
list_arg(PyObject *arg, struct bc_dirent **ents, size_t *n)
{
    long dirfd = check_dirfd(arg);
    if (dirfd < 0)
        return -1;
    int r;
    Py_BEGIN_ALLOW_THREADS
    r = list_dir((int)dirfd, 0, ents, n);
    Py_END_ALLOW_THREADS
    return r < 0 ? -1 : 0;
}

static PyObject *
bc_scandir(PyObject *self, PyObject *arg)
{
    struct bc_dirent *ents = NULL;
    size_t n = 0;
    if (list_arg(arg, &ents, &n) < 0)
        Py_RETURN_NONE;
    PyObject *out = PyList_New((Py_ssize_t)n);
    if (out == NULL) {
        free_dirents(ents, n);
        return NULL;
    }
    for (size_t i = 0; i < n; i++) {
        PyObject *pair = entry_pair(&ents[i]);
        if (pair == NULL) {
            Py_DECREF(out);
            free_dirents(ents, n);
            return NULL;
        }
        PyList_SET_ITEM(out, (Py_ssize_t)i, pair);
    }
    free_dirents(ents, n);
    return out;
}

/* ---- Listing: scandir's result kept in C --------------------------------------------------
 *
 * The same (name, lstat) pairs as scandir, as a read-only sequence whose items are built only
 * when Python asks for one (then kept): encode_batch and skip_same read the C stat directly,
 * so the common entries never become stat_result objects (19 objects and 3 floats each). */

typedef struct {
    PyObject_HEAD
    Py_ssize_t n;
    struct bc_dirent *ents;
    PyObject **items;
} ListingObject;

static void
listing_dealloc(ListingObject *self)
{
    if (self->items != NULL) {
        for (Py_ssize_t i = 0; i < self->n; i++)
            Py_XDECREF(self->items[i]);
        PyMem_Free(self->items);
    }
    free_dirents(self->ents, (size_t)self->n);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static Py_ssize_t
listing_len(ListingObject *self)
{
    return self->n;
}

static PyObject *
listing_item(ListingObject *self, Py_ssize_t i)
{
    if (i < 0 || i >= self->n) {
        PyErr_SetString(PyExc_IndexError, "Listing index out of range");
        return NULL;
    }
    PyObject *it = self->items[i];
    if (it == NULL) {
        it = entry_pair(&self->ents[i]);
        if (it == NULL)
            return NULL;
        self->items[i] = it;
    }
    Py_INCREF(it);
    return it;
}

static PySequenceMethods listing_as_sequence = {
    .sq_length = (lenfunc)listing_len,
    .sq_item = (ssizeargfunc)listing_item,
};

static PyTypeObject ListingType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "blobchain.layers._speedups.Listing",
    .tp_basicsize = sizeof(ListingObject),
    .tp_dealloc = (destructor)listing_dealloc,
    .tp_as_sequence = &listing_as_sequence,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A directory's (name, lstat) pairs sorted by raw name; items are built on first use.",
};

static PyObject *
make_listing(struct bc_dirent *ents, size_t n)
{
    /* a Listing that owns ``ents`` (freed here on failure) */
    ListingObject *obj = PyObject_New(ListingObject, &ListingType);
    if (obj == NULL) {
        free_dirents(ents, n);
        return NULL;
    }
    obj->n = (Py_ssize_t)n;
    obj->ents = ents;
    obj->items = PyMem_Calloc(n ? n : 1, sizeof(PyObject *));
    if (obj->items == NULL) {
        Py_DECREF(obj);
        return PyErr_NoMemory();
    }
    return (PyObject *)obj;
}

static PyObject *
bc_listing(PyObject *self, PyObject *arg)
{
    struct bc_dirent *ents = NULL;
    size_t n = 0;
    if (list_arg(arg, &ents, &n) < 0)
        Py_RETURN_NONE;
    return make_listing(ents, n);
}

static PyObject *
bc_listing_at(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    /* (rootfd, rel) -> Listing | None: directory ``rel`` opened beneath rootfd (openat2, no
     * symlink followed; b"" is rootfd itself) and listed in one call. None on anything unusual
     * (a path the Python check must see, any error): Snapshot.scandir then lists it again and
     * raises the named error. */
    if (nargs != 2 || !PyLong_Check(args[0]) || !PyBytes_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "listing_at: bad arguments");
        return NULL;
    }
    long rootfd = check_dirfd(args[0]);
    if (rootfd < 0)
        Py_RETURN_NONE;
    const char *rel = PyBytes_AS_STRING(args[1]);
    Py_ssize_t rlen = PyBytes_GET_SIZE(args[1]);
    if (rlen > 0 && !rel_is_plain(rel, rlen))
        Py_RETURN_NONE;
    struct bc_dirent *ents = NULL;
    size_t n = 0;
    int r;
    Py_BEGIN_ALLOW_THREADS
    if (rlen == 0) {
        r = list_dir((int)rootfd, 0, &ents, &n);
    } else {
        int fd = open_beneath((int)rootfd, rel, BC_O_DIR);
        r = fd < 0 ? -1 : list_dir(fd, 1, &ents, &n);
    }
    Py_END_ALLOW_THREADS
    if (r < 0)
        Py_RETURN_NONE;
    return make_listing(ents, n);
}

/* ---- encode_batch ---------------------------------------------------------------------- */

/* Appends to a growing output buffer (a bytearray-like C buffer turned into bytes at the end). */
struct bc_buf {
    char *p;
    size_t len, cap;
};

static char *
buf_reserve(struct bc_buf *b, size_t n)
{
    if (b->len + n > b->cap) {
        size_t ncap = b->cap ? b->cap : 1 << 16;
        while (ncap < b->len + n)
            ncap *= 2;
        char *np = realloc(b->p, ncap);
        if (np == NULL)
            return NULL;
        b->p = np;
        b->cap = ncap;
    }
    return b->p + b->len;
}

static int
stat_ll(PyObject *st, Py_ssize_t i, long long *out)
{
    PyObject *o = PyStructSequence_GET_ITEM(st, i);
    if (o == NULL || !PyLong_CheckExact(o))
        return 0;
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (overflow || (v == -1 && PyErr_Occurred())) {
        PyErr_Clear();
        return 0;
    }
    *out = v;
    return 1;
}

static int
stat_ull(PyObject *st, Py_ssize_t i, unsigned long long *out)
{
    PyObject *o = PyStructSequence_GET_ITEM(st, i);
    if (o == NULL || !PyLong_CheckExact(o))
        return 0;
    unsigned long long v = PyLong_AsUnsignedLongLong(o);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    *out = v;
    return 1;
}

/* What the walk saw of one entry, from a C stat (a Listing) or an os.stat_result (a list). */
struct bc_meta {
    long long mode, nlink, uid, gid, size, rdev;
    long long mtime_sec, mtime_nsec, ctime_sec, ctime_nsec; /* floor seconds, 0..999999999 ns */
    unsigned long long ino, dev;
};

static void
split_ns(long long ns, long long *sec, long long *nsec)
{
    /* Python's divmod(ns, 10**9): floor, also before 1970 */
    long long s = ns / 1000000000LL, r = ns % 1000000000LL;
    if (r < 0) {
        r += 1000000000LL;
        s -= 1;
    }
    *sec = s;
    *nsec = r;
}

static int
meta_from_stat_result(PyObject *st, struct bc_meta *m)
{
    long long mtime_ns, ctime_ns;
    if (!PyObject_TypeCheck(st, (PyTypeObject *)stat_result_type) || !stat_ll(st, 0, &m->mode) ||
        !stat_ull(st, 1, &m->ino) || !stat_ull(st, 2, &m->dev) || !stat_ll(st, 3, &m->nlink) ||
        !stat_ll(st, 4, &m->uid) || !stat_ll(st, 5, &m->gid) || !stat_ll(st, 6, &m->size) ||
        !stat_ll(st, 14, &mtime_ns) || !stat_ll(st, 15, &ctime_ns) || !stat_ll(st, 18, &m->rdev))
        return 0;
    split_ns(mtime_ns, &m->mtime_sec, &m->mtime_nsec);
    split_ns(ctime_ns, &m->ctime_sec, &m->ctime_nsec);
    return 1;
}

static int
meta_from_stat(const struct stat *st, struct bc_meta *m)
{
    /* seconds whose nanosecond count overflows 64 bits (year 2262) go to the Python path */
    const long long lim = 9000000000LL;
    if (st->st_mtim.tv_sec > lim || st->st_mtim.tv_sec < -lim || st->st_ctim.tv_sec > lim || st->st_ctim.tv_sec < -lim)
        return 0;
    m->mode = (long long)st->st_mode;
    m->ino = (unsigned long long)st->st_ino;
    m->dev = (unsigned long long)st->st_dev;
    m->nlink = (long long)st->st_nlink;
    m->uid = st->st_uid == (uid_t)-1 ? -1 : (long long)st->st_uid;
    m->gid = st->st_gid == (gid_t)-1 ? -1 : (long long)st->st_gid;
    m->size = (long long)st->st_size;
    m->rdev = (long long)st->st_rdev;
    m->mtime_sec = (long long)st->st_mtim.tv_sec;
    m->mtime_nsec = (long long)st->st_mtim.tv_nsec;
    m->ctime_sec = (long long)st->st_ctim.tv_sec;
    m->ctime_nsec = (long long)st->st_ctim.tv_nsec;
    return 1;
}

/* The walked entry i of a listing (a Listing or a list of (bytes, stat_result)): its name
 * and metadata; 0 when it is not something the native paths take. */
static int
listing_entry(PyObject *listing, Py_ssize_t i, const char **name, Py_ssize_t *nlen, struct bc_meta *m)
{
    if (Py_IS_TYPE(listing, &ListingType)) {
        const struct bc_dirent *e = &((ListingObject *)listing)->ents[i];
        *name = e->name;
        *nlen = (Py_ssize_t)strlen(e->name);
        return meta_from_stat(&e->st, m);
    }
    PyObject *item = PyList_GET_ITEM(listing, i);
    if (!PyTuple_CheckExact(item) || PyTuple_GET_SIZE(item) != 2 || !PyBytes_CheckExact(PyTuple_GET_ITEM(item, 0)))
        return 0;
    PyObject *oname = PyTuple_GET_ITEM(item, 0);
    *name = PyBytes_AS_STRING(oname);
    *nlen = PyBytes_GET_SIZE(oname);
    if ((Py_ssize_t)strlen(*name) != *nlen)
        return 0;
    return meta_from_stat_result(PyTuple_GET_ITEM(item, 1), m);
}

static Py_ssize_t
listing_size(PyObject *listing)
{
    if (Py_IS_TYPE(listing, &ListingType))
        return ((ListingObject *)listing)->n;
    if (PyList_CheckExact(listing))
        return PyList_GET_SIZE(listing);
    return -1;
}

/* ---- security.capability lookups ------------------------------------------------------- */

/* getxattrat(2) (Linux >= 6.13) looks one name up relative to the listing's directory instead
 * of resolving the whole path again. use_getxattrat: 1 try it, 0 the path call only (set on
 * ENOSYS, or by set_getxattrat for tests and BLOBCHAIN_NO_GETXATTRAT). */
static int use_getxattrat = 1;

#ifndef SYS_getxattrat
#define SYS_getxattrat 464
#endif

struct bc_xattr_args {
    uint64_t value;
    uint32_t size;
    uint32_t flags;
};

static const char CAP_NAME[] = "security.capability";

static ssize_t
capability_size(int dirfd, const char *base, const char *full)
{
    /* the size of security.capability (0 copied), -1 with errno */
    if (use_getxattrat) {
        struct bc_xattr_args xa = {0, 0, 0};
        long r = syscall(SYS_getxattrat, dirfd, base, AT_SYMLINK_NOFOLLOW, CAP_NAME, &xa, sizeof xa);
        if (r >= 0 || (errno != ENOSYS && errno != EPERM && errno != EINVAL))
            return (ssize_t)r;
        if (errno == ENOSYS)
            use_getxattrat = 0; /* EPERM (a seccomp filter) or EINVAL: the path lookup, this time */
    }
    return lgetxattr(full, CAP_NAME, NULL, 0);
}

static int
no_capability(ssize_t r)
{
    /* absent or unsupported: the common case; a value or any other error: the Python path */
    return r < 0 && (errno == ENODATA || errno == ENOTSUP || errno == EOPNOTSUPP);
}

static PyObject *
set_getxattrat(PyObject *self, PyObject *arg)
{
    int on = PyObject_IsTrue(arg);
    if (on < 0)
        return NULL;
    int was = use_getxattrat;
    use_getxattrat = on;
    return PyBool_FromLong(was);
}

/* ---- encode_batch ---------------------------------------------------------------------- */

/* One entry of a base layer (every walked entry an Add), the way entries.EntryWriter.handle and
 * tarwriter.write_tar write it, for the common case only: a directory, or a regular file with
 * one link and a body under 512 KiB; no capability; a header the USTAR fast path takes; sde
 * clamp as in handle. 1: appended; 0: not this case (nothing appended, the Python path takes
 * the entry); -1: Python error set. */
static int
encode_one(struct bc_buf *out, int dirfd, const char *cap_path, size_t cap_plen, const char *path, Py_ssize_t plen,
           const char *base, const struct bc_meta *m, int have_sde, long long sde, int *is_dir)
{
    long long mode = m->mode, size = m->size;
    int fmt = (int)(mode & S_IFMT);
    char tf;
    if (fmt == S_IFDIR) {
        /* S_IFDIR shares a bit with containerd's loose device test: a directory with an rdev
         * would carry device numbers (entries.EntryWriter.handle), so only rdev 0 is taken here */
        if (m->rdev != 0)
            return 0;
        tf = '5';
        size = 0;
    } else if (fmt == S_IFREG && m->nlink <= 1) {
        tf = '0';
        if (size >= (1LL << 19))
            return 0;
    } else {
        return 0; /* symlinks, devices, FIFOs, sockets, hardlinks: the Python path */
    }
    /* mtime: Go Truncate(1s) is a floor; containerd 1.7's clamp first (entries.EntryWriter.handle) */
    long long sec = m->mtime_sec;
    long long mtime = (have_sde && (sec > sde || (sec == sde && m->mtime_nsec > 0))) ? sde : sec;
    long long perm = mode & 07777;
    const long long max7 = 1LL << 21, max11 = 1LL << 33;
    if (m->uid < 0 || m->uid >= max7 || m->gid < 0 || m->gid >= max7 || mtime < 0 || mtime >= max11 || size < 0)
        return 0;

    /* name: path, "/" appended for a directory; the fast path needs it ASCII (no NUL) */
    if (!is_ascii(path, plen) || plen + 1 >= 4096)
        return 0;
    char namebuf[4096];
    memcpy(namebuf, path, (size_t)plen);
    Py_ssize_t nlen = plen;
    if (fmt == S_IFDIR)
        namebuf[nlen++] = '/';
    const char *name = namebuf, *prefix = "";
    Py_ssize_t pfx = 0;
    if (nlen > 100 && !split_name(&name, &nlen, &prefix, &pfx))
        return 0;

    char full[8192];
    if (cap_plen + (size_t)plen + 1 > sizeof full)
        return 0;
    memcpy(full, cap_path, cap_plen);
    memcpy(full + cap_plen, path, (size_t)plen);
    full[cap_plen + (size_t)plen] = 0;
    if (fmt == S_IFDIR || size == 0) {
        /* no body to open: the capability by name, beneath the listing's directory */
        ssize_t xr;
        Py_BEGIN_ALLOW_THREADS
        xr = capability_size(dirfd, base, full);
        Py_END_ALLOW_THREADS
        if (!no_capability(xr))
            return 0;
    }

    size_t pad = (size_t)((512 - (size % 512)) % 512);
    size_t start = out->len;
    char *b = buf_reserve(out, 512 + (size_t)size + pad);
    if (b == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    fill_block(b, name, nlen, prefix, pfx, perm, m->uid, m->gid, size, mtime, tf, "", 0, 0, 0);
    out->len += 512;
    if (fmt == S_IFDIR) {
        *is_dir = 1;
        return 1;
    }
    if (size == 0)
        return 1;

    /* The body: opened beneath the listing's directory (itself opened beneath the root) by its
     * name; its capability read on the open descriptor (the file read, not a name looked up
     * again); then exactly size bytes; then ONE fstat, which must show the walked file
     * (regular, size, inode, device, mtime) with the walked ctime. ctime moves on every write
     * and metadata change, and the listing's lstat read it (so on a multigrain-timestamp
     * kernel the next change gets a distinct one): a change at any moment between the listing
     * and that fstat, including during the read, shows there. The Python path then reads the
     * file again and decides (it raises FileChanged if it is not the walked file). */
    int ok = 0;
    Py_BEGIN_ALLOW_THREADS
    int fd = open_beneath(dirfd, base, BC_O_FILE);
    struct stat after;
    if (fd >= 0) {
        if (no_capability(fgetxattr(fd, CAP_NAME, NULL, 0))) {
            char *p = out->p + out->len;
            long long remaining = size;
            while (remaining > 0) {
                ssize_t n = read(fd, p, (size_t)remaining);
                if (n < 0 && errno == EINTR)
                    continue;
                if (n <= 0)
                    break;
                p += n;
                remaining -= n;
            }
            ok = remaining == 0 && fstat(fd, &after) == 0 && S_ISREG(after.st_mode) && (long long)after.st_size == size &&
                 (unsigned long long)after.st_ino == m->ino && (unsigned long long)after.st_dev == m->dev &&
                 (long long)after.st_mtim.tv_sec == m->mtime_sec && (long long)after.st_mtim.tv_nsec == m->mtime_nsec &&
                 (long long)after.st_ctim.tv_sec == m->ctime_sec && (long long)after.st_ctim.tv_nsec == m->ctime_nsec;
        }
        close(fd);
    }
    Py_END_ALLOW_THREADS
    if (!ok) {
        out->len = start; /* the Python path reads it again and raises the named error */
        return 0;
    }
    memset(out->p + out->len + size, 0, pad);
    out->len += (size_t)size + pad;
    return 1;
}

static PyObject *
encode_batch(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    /* (rootfd, root_prefix, prefix, listing, start, sde, added_dirs, limit) ->
     *   (data, next, entries, reason): the entries listing[start:next] encoded (headers, bodies,
     *   padding), stopping at the end of the listing (reason 0), after a directory (1: the caller
     *   walks into it first, as the pre-order walk does), before an entry the Python path must
     *   take (2: listing[next]), or once data reaches limit bytes (3). */
    if (nargs != 8) {
        PyErr_SetString(PyExc_TypeError, "encode_batch takes 8 arguments");
        return NULL;
    }
    PyObject *oroot = args[1], *oprefix = args[2], *listing = args[3], *added = args[6];
    if (stat_result_type == NULL || !PyLong_Check(args[0]) || !PyBytes_Check(oroot) || !PyBytes_Check(oprefix) ||
        listing_size(listing) < 0 || !PyLong_Check(args[4]) || !PySet_Check(added) || !PyLong_Check(args[7])) {
        PyErr_SetString(PyExc_TypeError, "encode_batch: bad arguments");
        return NULL;
    }
    int rootfd = (int)PyLong_AsLong(args[0]);
    Py_ssize_t start = PyLong_AsSsize_t(args[4]);
    Py_ssize_t limit = PyLong_AsSsize_t(args[7]);
    int have_sde = args[5] != Py_None;
    long long sde = 0;
    int native = 1;
    if (have_sde) {
        int overflow = 0;
        sde = PyLong_AsLongLongAndOverflow(args[5], &overflow);
        if (overflow)
            native = 0; /* an out-of-range epoch: every entry to the Python path */
    }
    if (PyErr_Occurred())
        return NULL;
    Py_ssize_t n = listing_size(listing);
    if (start < 0 || start > n) {
        PyErr_SetString(PyExc_ValueError, "encode_batch: start out of range");
        return NULL;
    }
    const char *root = PyBytes_AS_STRING(oroot);
    size_t rlen = (size_t)PyBytes_GET_SIZE(oroot);
    const char *pre = PyBytes_AS_STRING(oprefix);
    Py_ssize_t prelen = PyBytes_GET_SIZE(oprefix);
    struct bc_buf out = {NULL, 0, 0};
    Py_ssize_t i = start, count = 0;
    int reason = 0; /* 0 end of listing, 1 descend, 2 a Python entry next, 3 limit reached */
    char path[4096];
    /* the listing's directory, opened beneath the root without following symlinks (as
     * Snapshot.open_dir); if that fails every entry goes to the Python path, which raises */
    int dirfd = rootfd;
    if (native && prelen > 0) {
        if (prelen >= (Py_ssize_t)sizeof path || pre[prelen - 1] != '/' || !rel_is_plain(pre, prelen - 1)) {
            native = 0;
        } else {
            memcpy(path, pre, (size_t)prelen - 1);
            path[prelen - 1] = 0;
            Py_BEGIN_ALLOW_THREADS
            dirfd = open_beneath(rootfd, path, O_PATH | O_DIRECTORY | O_CLOEXEC);
            Py_END_ALLOW_THREADS
            if (dirfd < 0)
                native = 0;
        }
    }
    while (native && i < n && (Py_ssize_t)out.len < limit) {
        const char *ename;
        Py_ssize_t nl;
        struct bc_meta meta;
        if (!listing_entry(listing, i, &ename, &nl, &meta) || prelen + nl >= (Py_ssize_t)sizeof path) {
            reason = 2;
            break;
        }
        memcpy(path, pre, (size_t)prelen);
        memcpy(path + prelen, ename, (size_t)nl);
        Py_ssize_t plen = prelen + nl;
        path[plen] = 0;
        int is_dir = 0;
        int r = 0;
        if (rel_is_plain(path + prelen, nl) && memchr(path + prelen, '/', (size_t)nl) == NULL)
            r = encode_one(&out, dirfd, root, rlen, path, plen, path + prelen, &meta, have_sde,
                           sde, &is_dir);
        if (r < 0) {
            if (dirfd != rootfd)
                close(dirfd);
            free(out.p);
            return NULL;
        }
        if (r == 0) {
            reason = 2;
            break;
        }
        i++;
        count++;
        if (is_dir) {
            PyObject *key = PyBytes_FromStringAndSize(path, plen);
            if (key == NULL || PySet_Add(added, key) < 0) {
                Py_XDECREF(key);
                if (dirfd != rootfd)
                    close(dirfd);
                free(out.p);
                return NULL;
            }
            Py_DECREF(key);
            reason = 1;
            break;
        }
    }
    if (dirfd != rootfd)
        close(dirfd);
    if (reason == 0 && i < n)
        reason = native ? 3 : 2;
    PyObject *data = PyBytes_FromStringAndSize(out.p ? out.p : "", (Py_ssize_t)out.len);
    free(out.p);
    if (data == NULL)
        return NULL;
    return Py_BuildValue("(Nnni)", data, i, count, reason);
}

/* ---- skip_same ------------------------------------------------------------------------- */

static ssize_t
read_full(int fd, char *buf, size_t want)
{
    size_t got = 0;
    while (got < want) {
        ssize_t n = read(fd, buf + got, want - got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return -1;
        if (n == 0)
            break;
        got += (size_t)n;
    }
    return (ssize_t)got;
}

#define BC_CMP_CHUNK (256 * 1024)

static int
same_content(int ldir, int udir, const char *name, char **bufs)
{
    /* changes.same_file's last two steps for two regular files: no capability on either (read
     * from the open descriptors: no second path lookup), then changes._same_content, both read
     * to the end and compared; 1 equal, 0 different, -1 a capability or an error (the Python
     * path looks again and decides or raises the named error) */
    int fa = open_beneath(ldir, name, BC_O_FILE);
    if (fa < 0)
        return -1;
    int fb = open_beneath(udir, name, BC_O_FILE);
    if (fb < 0) {
        close(fa);
        return -1;
    }
    int r = -1;
    if (!no_capability(fgetxattr(fa, CAP_NAME, NULL, 0)) || !no_capability(fgetxattr(fb, CAP_NAME, NULL, 0))) {
        close(fa);
        close(fb);
        return -1;
    }
    if (*bufs == NULL)
        *bufs = malloc(2 * BC_CMP_CHUNK);
    if (*bufs != NULL) {
        char *a = *bufs, *b = *bufs + BC_CMP_CHUNK;
        for (;;) {
            ssize_t na = read_full(fa, a, BC_CMP_CHUNK), nb = read_full(fb, b, BC_CMP_CHUNK);
            if (na < 0 || nb < 0)
                break;
            if (na != nb || memcmp(a, b, (size_t)na) != 0) {
                r = 0;
                break;
            }
            if (na < BC_CMP_CHUNK) {
                r = 1;
                break;
            }
        }
    }
    close(fa);
    close(fb);
    return r;
}

static int
same_target(int ldir, int udir, const char *name)
{
    /* changes.same_file for two symlinks with whole-second mtimes: the same raw target; 1 equal,
     * 0 different, -1 an error or a target too long for the buffer (the Python path decides) */
    char a[4096], b[4096];
    ssize_t na = readlinkat(ldir, name, a, sizeof a), nb = readlinkat(udir, name, b, sizeof b);
    if (na < 0 || nb < 0 || na == (ssize_t)sizeof a || nb == (ssize_t)sizeof b)
        return -1;
    return na == nb && memcmp(a, b, (size_t)na) == 0;
}

static int
open_prefix(int rootfd, const char *pre, Py_ssize_t prelen)
{
    /* the directory prefix ("a/b/") names, beneath rootfd, never following a symlink */
    if (prelen == 0)
        return rootfd;
    char path[4096];
    if (prelen >= (Py_ssize_t)sizeof path || pre[prelen - 1] != '/' || !rel_is_plain(pre, prelen - 1))
        return -1;
    memcpy(path, pre, (size_t)prelen - 1);
    path[prelen - 1] = 0;
    return open_beneath(rootfd, path, O_PATH | O_DIRECTORY | O_CLOEXEC);
}

static int
full_path(char *dst, size_t cap, PyObject *root, const char *pre, Py_ssize_t prelen, const char *name)
{
    size_t rl = (size_t)PyBytes_GET_SIZE(root), nl = strlen(name);
    if (rl + (size_t)prelen + nl + 1 > cap)
        return 0;
    memcpy(dst, PyBytes_AS_STRING(root), rl);
    memcpy(dst + rl, pre, (size_t)prelen);
    memcpy(dst + rl + (size_t)prelen, name, nl + 1);
    return 1;
}

/* The directory being listed, in both trees, opened beneath the roots on first need. */
struct bc_dir_pair {
    int lroot, uroot, ldir, udir; /* ldir/udir: -2 not opened yet, -1 failed */
    PyObject *lprefix, *uprefix;  /* the roots' absolute paths with a trailing slash */
    const char *pre;              /* the directory relative to the roots ("" or "a/b/") */
    Py_ssize_t prelen;
};

static int
dir_pair_open(struct bc_dir_pair *d)
{
    if (d->ldir == -2) {
        d->ldir = open_prefix(d->lroot, d->pre, d->prelen);
        d->udir = open_prefix(d->uroot, d->pre, d->prelen);
    }
    return d->ldir >= 0 && d->udir >= 0;
}

static void
dir_pair_close(struct bc_dir_pair *d)
{
    if (d->ldir >= 0 && d->ldir != d->lroot)
        close(d->ldir);
    if (d->udir >= 0 && d->udir != d->uroot)
        close(d->udir);
}

static int
pair_without_capability(const struct bc_dir_pair *d, const char *name)
{
    /* 1 when neither side's ``name`` has security.capability (looked up beneath the open
     * directories; by absolute path where getxattrat is missing) */
    char lfull[8192], ufull[8192];
    return full_path(lfull, sizeof lfull, d->lprefix, d->pre, d->prelen, name) &&
           full_path(ufull, sizeof ufull, d->uprefix, d->pre, d->prelen, name) &&
           no_capability(capability_size(d->ldir, name, lfull)) && no_capability(capability_size(d->udir, name, ufull));
}

static int
same_inode(const struct stat *a, const struct stat *b)
{
    return a->st_ino == b->st_ino && a->st_dev == b->st_dev;
}

static int
same_owner_and_mode(const struct stat *a, const struct stat *b)
{
    return a->st_mode == b->st_mode && a->st_uid == b->st_uid && a->st_gid == b->st_gid && a->st_rdev == b->st_rdev;
}

static PyObject *
skip_same(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    /* (lower_rootfd, upper_rootfd, lower_root_prefix, upper_root_prefix, prefix, lower, upper,
     *  i, j) -> (i, j, same_dir): past the leading pairs lower[i:], upper[j:] that
     * changes._walk would drop without a word: the same name on both sides, not a directory
     * (the walk descends), one link (else an Unmodified change), and changes.same_file true: the
     * same inode, or the same metadata, no capability on either side, and equal nanoseconds, or
     * an empty file, or equal content or symlink target (whole-second mtimes). It stops at the
     * first pair it cannot settle that way (including any error): the Python walk takes that
     * pair and decides (and raises). same_dir: the stopping pair's name when it is a directory
     * pair same_file holds for (the walk descends without checking it), else None. */
    if (nargs != 9 || !PyLong_Check(args[0]) || !PyLong_Check(args[1]) || !PyBytes_Check(args[2]) ||
        !PyBytes_Check(args[3]) || !PyBytes_Check(args[4]) || !PyLong_Check(args[7]) || !PyLong_Check(args[8])) {
        PyErr_SetString(PyExc_TypeError, "skip_same: bad arguments");
        return NULL;
    }
    int lroot = (int)PyLong_AsLong(args[0]), uroot = (int)PyLong_AsLong(args[1]);
    Py_ssize_t i = PyLong_AsSsize_t(args[7]), j = PyLong_AsSsize_t(args[8]);
    if (PyErr_Occurred())
        return NULL;
    PyObject *olow = args[5], *oup = args[6];
    if (!Py_IS_TYPE(olow, &ListingType) || !Py_IS_TYPE(oup, &ListingType) || lroot < 0 || uroot < 0)
        return Py_BuildValue("(nnO)", i, j, Py_None);
    ListingObject *ll = (ListingObject *)olow, *ul = (ListingObject *)oup;
    if (i < 0 || j < 0 || i > ll->n || j > ul->n) {
        PyErr_SetString(PyExc_ValueError, "skip_same: index out of range");
        return NULL;
    }
    struct bc_dir_pair d = {lroot, uroot, -2, -2, args[2], args[3], PyBytes_AS_STRING(args[4]), PyBytes_GET_SIZE(args[4])};
    char *bufs = NULL;
    const char *same_dir = NULL; /* the stopping pair is a directory pair same_file found equal */
    Py_BEGIN_ALLOW_THREADS
    while (i < ll->n && j < ul->n) {
        const struct bc_dirent *ea = &ll->ents[i], *eb = &ul->ents[j];
        const struct stat *a = &ea->st, *b = &eb->st;
        if (strcmp(ea->name, eb->name) != 0)
            break;
        if (S_ISDIR(b->st_mode)) {
            /* The walk descends into it, so it stops here; it settles same_file when it is true
             * (the same inode, or the same metadata and no capability on either side), sparing
             * the Python walk its checks. Anything else the Python walk decides. */
            if (same_inode(a, b) ||
                (same_owner_and_mode(a, b) && dir_pair_open(&d) && pair_without_capability(&d, ea->name)))
                same_dir = eb->name;
            break;
        }
        if (b->st_nlink > 1)
            break;
        if (!same_inode(a, b)) {
            if (!same_owner_and_mode(a, b) || a->st_size != b->st_size || a->st_mtim.tv_sec != b->st_mtim.tv_sec ||
                a->st_mtim.tv_nsec != b->st_mtim.tv_nsec || !dir_pair_open(&d))
                break;
            int by_content = b->st_mtim.tv_nsec == 0 && b->st_size != 0;
            if (by_content && S_ISREG(b->st_mode)) {
                /* whole seconds, maybe truncated: the content decides (capabilities checked on
                 * the descriptors it opens) */
                if (same_content(d.ldir, d.udir, ea->name, &bufs) != 1)
                    break;
            } else if (!pair_without_capability(&d, ea->name) ||
                       /* a symlink's target decides; any other kind with a size, the Python walk */
                       (by_content && (!S_ISLNK(b->st_mode) || same_target(d.ldir, d.udir, ea->name) != 1))) {
                break;
            }
        }
        i++;
        j++;
    }
    Py_END_ALLOW_THREADS
    free(bufs);
    dir_pair_close(&d);
    if (same_dir != NULL)
        return Py_BuildValue("(nny)", i, j, same_dir);
    return Py_BuildValue("(nnO)", i, j, Py_None);
}

/* ---- module ---------------------------------------------------------------------------- */

static PyMethodDef methods[] = {
    {"ustar_header", (PyCFunction)(void (*)(void))ustar_header, METH_FASTCALL,
     "ustar_header(name, mode, uid, gid, size, mtime, typeflag, linkname, devmajor, devminor) -> "
     "bytes | None: the one-block USTAR header, or None when the Python encoder must decide."},
    {"read_body", (PyCFunction)(void (*)(void))read_body, METH_FASTCALL,
     "read_body(rootfd, rel, size, ino, dev, mtime_ns, header) -> bytes | None: header + body + "
     "padding of one regular file opened beneath rootfd, or None on any anomaly."},
    {"lgetxattr", (PyCFunction)(void (*)(void))bc_lgetxattr, METH_FASTCALL,
     "lgetxattr(path, name) -> bytes | None: None when the attribute is absent or unsupported."},
    {"scandir", (PyCFunction)bc_scandir, METH_O,
     "scandir(dirfd) -> list[tuple[bytes, os.stat_result]] | None: the entries of an open directory "
     "with their lstat, sorted by raw name; None on any error."},
    {"listing", (PyCFunction)bc_listing, METH_O,
     "listing(dirfd) -> Listing | None: scandir's pairs kept in C (items built on first use); None "
     "on any error."},
    {"listing_at", (PyCFunction)(void (*)(void))bc_listing_at, METH_FASTCALL,
     "listing_at(rootfd, rel) -> Listing | None: directory rel, opened beneath rootfd without "
     "following a symlink, listed as listing() lists it; None on any error."},
    {"skip_same", (PyCFunction)(void (*)(void))skip_same, METH_FASTCALL,
     "skip_same(lower_rootfd, upper_rootfd, lower_root_prefix, upper_root_prefix, prefix, lower, upper, "
     "i, j) -> (i, j, same_dir): past the leading pairs of two Listings the double walk drops "
     "unreported; same_dir is the name of the directory pair it stopped at when same_file "
     "holds for it (the walk descends without checking it again), else None."},
    {"set_getxattrat", (PyCFunction)set_getxattrat, METH_O,
     "set_getxattrat(on) -> bool: whether capability lookups try getxattrat(2) (else the path "
     "call); returns the previous setting."},
    {"encode_batch", (PyCFunction)(void (*)(void))encode_batch, METH_FASTCALL,
     "encode_batch(rootfd, root_prefix, prefix, listing, start, sde, added_dirs, limit) -> "
     "(data, next, entries, reason): a base layer's common entries of one directory listing."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moddef = {
    PyModuleDef_HEAD_INIT, "_speedups", "Native twins of blobchain's per-entry hot loop.", -1, methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    PyObject *os = PyImport_ImportModule("os");
    if (os == NULL)
        return NULL;
    stat_result_type = PyObject_GetAttrString(os, "stat_result");
    Py_DECREF(os);
    if (stat_result_type == NULL)
        return NULL;
    /* the Linux layout this module fills (posixmodule's stat_result_fields) */
    PyObject *nf = PyObject_GetAttrString(stat_result_type, "n_fields");
    long n_fields = nf ? PyLong_AsLong(nf) : -1;
    Py_XDECREF(nf);
    if (n_fields != 19 || !PyType_Check(stat_result_type)) {
        PyErr_Clear();
        Py_CLEAR(stat_result_type); /* unknown layout: scandir answers None (Python path) */
    }
    if (PyType_Ready(&ListingType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&moddef);
    if (m == NULL)
        return NULL;
    Py_INCREF(&ListingType);
    if (PyModule_AddObject(m, "Listing", (PyObject *)&ListingType) < 0) {
        Py_DECREF(&ListingType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
