// Command gen writes the golden vectors for tests/layers/test_tarheader.py, test_tarwriter.py
// and test_windows.py using Go's own archive/tar (run it with the Go that matches containerd
// 1.6.20's toolchain, 1.19.x):
//
//	cd tests/layers/golden && go run gen.go
//
// Headers are built the way containerd 1.6.20's ChangeWriter builds them (Format = PAX,
// ModTime = time.Unix(sec, 0), no atime/ctime); whiteouts leave Format unset. The Windows
// vectors replay BuildKit's util/winlayers rewrite (read the containerd-style stream back with
// tar.Reader, prefix "Files/", add the Windows PAX records, write with tar.Writer), with the
// Hives/Files time fixed to an epoch instead of time.Now().
package main

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"runtime"
	"strings"
	"time"
)

type entry struct {
	Name     string            `json:"name_hex"`
	Typeflag string            `json:"typeflag"`
	Mode     int64             `json:"mode"`
	Uid      int               `json:"uid"`
	Gid      int               `json:"gid"`
	Size     int64             `json:"size"`
	Mtime    int64             `json:"mtime"`
	Linkname string            `json:"linkname_hex"`
	Devmajor int64             `json:"devmajor"`
	Devminor int64             `json:"devminor"`
	Pax      map[string]string `json:"pax_hex"`
	Whiteout bool              `json:"whiteout"` // Format left unset, as containerd does for whiteouts
	Body     string            `json:"body_hex,omitempty"`
}

type headerCase struct {
	ID     string `json:"id"`
	Entry  entry  `json:"entry"`
	Header string `json:"header_hex"`
}

type streamCase struct {
	ID      string  `json:"id"`
	Epoch   int64   `json:"epoch,omitempty"`
	Entries []entry `json:"entries"`
	Tar     string  `json:"tar_hex"`
	Sha256  string  `json:"sha256"`
}

func hx(s string) string { return hex.EncodeToString([]byte(s)) }

// header builds the tar.Header containerd would hand to WriteHeader.
func header(name string, tf byte, mode int64, uid, gid int, size, mtime int64, link string) *tar.Header {
	return &tar.Header{
		Name: name, Typeflag: tf, Mode: mode, Uid: uid, Gid: gid, Size: size,
		ModTime: time.Unix(mtime, 0), Linkname: link, Format: tar.FormatPAX,
	}
}

func toEntry(h *tar.Header, body []byte) entry {
	e := entry{
		Name: hx(h.Name), Typeflag: string([]byte{h.Typeflag}), Mode: h.Mode, Uid: h.Uid, Gid: h.Gid,
		Size: h.Size, Mtime: h.ModTime.Unix(), Linkname: hx(h.Linkname), Devmajor: h.Devmajor,
		Devminor: h.Devminor, Pax: map[string]string{}, Whiteout: h.Format == tar.FormatUnknown,
	}
	for k, v := range h.PAXRecords {
		e.Pax[k] = hx(v)
	}
	if body != nil {
		e.Body = hex.EncodeToString(body)
	}
	return e
}

func must(err error) {
	if err != nil {
		_, file, line, _ := runtime.Caller(1)
		panic(fmt.Sprintf("%s:%d: %v", file, line, err))
	}
}

func rep(s string, n int) string { return strings.Repeat(s, n) }

// capability is a VFS_CAP_REVISION_2 blob with high bytes and NULs (cap_net_bind_service+ep).
var capability = "\x01\x00\x00\x02\x00\x04\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"

func headerCases() []headerCase {
	type c struct {
		id string
		h  *tar.Header
	}
	wh := func(name string, mtime int64) *tar.Header {
		// containerd's whiteout: Format unset, so Go rounds ModTime and drops atime/ctime.
		return &tar.Header{Name: name, Typeflag: tar.TypeReg, ModTime: time.Unix(mtime, 0),
			AccessTime: time.Unix(mtime, 0), ChangeTime: time.Unix(mtime, 0)}
	}
	withPax := func(h *tar.Header, kv ...string) *tar.Header {
		h.PAXRecords = map[string]string{}
		for i := 0; i < len(kv); i += 2 {
			h.PAXRecords[kv[i]] = kv[i+1]
		}
		return h
	}
	dev := func(name string, tf byte, major, minor int64) *tar.Header {
		h := header(name, tf, 0o644, 0, 0, 0, 1700000000, "")
		h.Devmajor, h.Devminor = major, minor
		return h
	}
	long129 := "longdir/" + rep("d", 60) + "/" + rep("f", 60)
	cases := []c{
		{"regular", header("file.txt", tar.TypeReg, 0o644, 1000, 1000, 4, 1700000000, "")},
		{"regular_empty", header("empty", tar.TypeReg, 0o600, 0, 0, 0, 0, "")},
		{"suid", header("suid", tar.TypeReg, 0o4755, 0, 0, 12, 1700000001, "")},
		{"dir", header("etc/", tar.TypeDir, 0o755, 0, 0, 0, 1700000000, "")},
		{"dir_sticky", header("tmp/", tar.TypeDir, 0o1777, 0, 0, 0, 1600000000, "")},
		{"symlink", header("lnk", tar.TypeSymlink, 0o777, 0, 0, 0, 1700000000, "../some/target")},
		{"hardlink", header("hl1", tar.TypeLink, 0o644, 0, 0, 0, 1700000000, "hl3")},
		{"chardev", dev("chardev", tar.TypeChar, 1, 3)},
		{"blockdev", dev("dev/sda1", tar.TypeBlock, 8, 1)},
		{"chardev_max", dev("dev/big", tar.TypeChar, 4095, 1048575)},
		{"fifo", header("fifo1", tar.TypeFifo, 0o644, 0, 0, 0, 1700000000, "")},
		{"whiteout", wh(".wh.deldir", 1700000123)},
		{"whiteout_nested", wh("etc/.wh.my-app-config", 1700000123)},
		{"whiteout_epoch0", wh("a/.wh.b", 0)},
		{"whiteout_long_nonascii", wh("wh/"+rep("ü", 60)+"/.wh."+rep("x", 90), 1700000123)},
		{"name_100", header(rep("n", 100), tar.TypeReg, 0o644, 0, 0, 1, 1700000000, "")},
		{"dir_100", header(rep("n", 99)+"/", tar.TypeDir, 0o755, 0, 0, 0, 1700000000, "")},
		{"dir_101_unsplittable", header(rep("x", 100)+"/", tar.TypeDir, 0o755, 0, 0, 0, 1700000000, "")},
		{"split_129", header(long129, tar.TypeReg, 0o644, 0, 0, 5, 1700000000, "")},
		{"split_go_point", header("a/"+rep("b", 50)+"/"+rep("c", 60), tar.TypeReg, 0o644, 0, 0, 0, 1700000000, "")},
		{"split_dir_trailing", header("a/"+rep("b", 50)+"/"+rep("c", 60)+"/", tar.TypeDir, 0o755, 0, 0, 0, 1700000000, "")},
		{"split_prefix_155", header(rep("p", 155)+"/"+rep("s", 100), tar.TypeReg, 0o644, 0, 0, 0, 1700000000, "")},
		{"unsplit_prefix_156", header(rep("p", 156)+"/"+rep("s", 10), tar.TypeReg, 0o644, 0, 0, 0, 1700000000, "")},
		{"unsplittable_118", header("longdir/"+rep("g", 110), tar.TypeReg, 0o644, 0, 0, 3, 1700000000, "")},
		{"path_282", header(rep("a", 100)+"/"+rep("b", 100)+"/"+rep("c", 80), tar.TypeReg, 0o644, 0, 0, 0, 1700000000, "")},
		{"path_300_dir", header(rep("a", 99)+"/"+rep("b", 99)+"/"+rep("c", 99)+"/", tar.TypeDir, 0o755, 0, 0, 0, 1700000000, "")},
		{"non_ascii", header("ünï.txt", tar.TypeReg, 0o644, 0, 0, 2, 1700000000, "")},
		{"invalid_utf8", header("bad\xff\xfe\xc3(na\x80me\xe2\x82", tar.TypeReg, 0o644, 0, 0, 0, 1700000000, "")},
		{"non_ascii_dir", header("dirü/", tar.TypeDir, 0o755, 0, 0, 0, 1700000000, "")},
		{"trailing_slash_rule", header("ü"+rep("a", 98)+"//"+rep("b", 5)+"/", tar.TypeDir, 0o755, 0, 0, 0, 1700000000, "")},
		{"pax_name_clean", header("x/../ü", tar.TypeReg, 0o644, 0, 0, 0, 1700000000, "")},
		{"pax_name_dotdot_long", header("../"+rep("é", 70)+"/"+rep("q", 95), tar.TypeReg, 0o644, 0, 0, 0, 1700000000, "")},
		{"link_101", header("sl", tar.TypeSymlink, 0o777, 0, 0, 0, 1700000000, "/"+rep("t", 100))},
		{"link_nonascii", header("sl2", tar.TypeSymlink, 0o777, 0, 0, 0, 1700000000, "tärget")},
		{"link_100", header("sl3", tar.TypeSymlink, 0o777, 0, 0, 0, 1700000000, rep("t", 100))},
		{"hardlink_long", header("hlx", tar.TypeLink, 0o644, 0, 0, 0, 1700000000, long129)},
		{"biguid", header("biguid", tar.TypeReg, 0o644, 3000000, 5, 4, 1700000000, "")},
		{"uid_max_octal", header("uidmax", tar.TypeReg, 0o644, 1<<21-1, 0, 0, 1700000000, "")},
		{"uid_2p21", header("uid21", tar.TypeReg, 0o644, 1<<21, 0, 0, 1700000000, "")},
		{"biggid", header("biggid", tar.TypeReg, 0o644, 0, 1<<31-2, 0, 1700000000, "")},
		{"size_max_octal", header("bigish", tar.TypeReg, 0o644, 0, 0, 1<<33-1, 1700000000, "")},
		{"size_8gib", header("big", tar.TypeReg, 0o644, 0, 0, 1<<33, 1700000000, "")},
		{"size_huge", header("huge", tar.TypeReg, 0o644, 0, 0, 1<<40+7, 1700000000, "")},
		{"mtime_max_octal", header("tmax", tar.TypeReg, 0o644, 0, 0, 0, 1<<33-1, "")},
		{"mtime_8p11", header("tfar", tar.TypeReg, 0o644, 0, 0, 0, 1<<33, "")},
		{"mtime_negative", header("tneg", tar.TypeReg, 0o644, 0, 0, 0, -86400, "")},
		{"capability", withPax(header("capfile", tar.TypeReg, 0o644, 0, 0, 7, 1700000000, ""),
			"SCHILY.xattr.security.capability", capability)},
		{"capability_split_name", withPax(header(long129, tar.TypeReg, 0o755, 0, 0, 0, 1700000000, ""),
			"SCHILY.xattr.security.capability", capability)},
		{"capability_everything", withPax(header(rep("é", 80)+"/f", tar.TypeReg, 0o755, 3000000, 1<<22, 1<<33, -1, ""),
			"SCHILY.xattr.security.capability", capability)},
		{"record_len_carry", withPax(header("carry", tar.TypeReg, 0o644, 0, 0, 0, 1700000000, ""),
			"SCHILY.xattr.security.capability", rep("\xff", 63))},
		{"record_len_carry2", withPax(header("carry2", tar.TypeReg, 0o644, 0, 0, 0, 1700000000, ""),
			"SCHILY.xattr.security.capability", rep("\x00", 64))},
		{"pax_basic_equal_kept", withPax(header("keep", tar.TypeReg, 0o644, 1000, 0, 0, 1700000000, ""),
			"uid", "1000", "mtime", "1700000000", "path", "keep")},
		{"pax_basic_unequal_ignored", withPax(header("ign", tar.TypeReg, 0o644, 1000, 0, 0, 1700000000, ""),
			"uid", "5", "atime", "12", "GNU.sparse.major", "1")},
		{"pax_many_sorted", withPax(header("Files/x", tar.TypeReg, 0o100644, 0, 0, 0, 1700000000, ""),
			"MSWINDOWS.fileattr", "32", "LIBARCHIVE.creationtime", "1700000000.0", "zz", "1", "SCHILY.xattr.a", "b", "a.b", "c")},
	}
	var out []headerCase
	for _, cs := range cases {
		var buf bytes.Buffer
		tw := tar.NewWriter(&buf)
		must(tw.WriteHeader(cs.h))
		out = append(out, headerCase{ID: cs.id, Entry: toEntry(cs.h, nil), Header: hex.EncodeToString(buf.Bytes())})
	}
	return out
}

type item struct {
	h    *tar.Header
	body []byte
}

// layer is a containerd-style stream covering every entry kind.
func layer() []item {
	body := func(n int, seed byte) []byte {
		b := make([]byte, n)
		for i := range b {
			b[i] = seed + byte(i*7)
		}
		return b
	}
	cap := header("capfile", tar.TypeReg, 0o755, 0, 0, 3, 1700000000, "")
	cap.PAXRecords = map[string]string{"SCHILY.xattr.security.capability": capability}
	whiteout := &tar.Header{Name: "etc/.wh.gone", Typeflag: tar.TypeReg, ModTime: time.Unix(1700000123, 0)}
	ch := header("chardev", tar.TypeChar, 0o644, 0, 0, 0, 1700000000, "")
	ch.Devmajor, ch.Devminor = 1, 3
	return []item{
		{header("biguid", tar.TypeReg, 0o644, 3000000, 5, 4, 1700000000, ""), []byte("abc\n")},
		{cap, []byte("cap")},
		{ch, nil},
		{header("etc/", tar.TypeDir, 0o755, 0, 0, 0, 1700000000, ""), nil},
		{whiteout, nil},
		{header("etc/block512", tar.TypeReg, 0o600, 1000, 1000, 512, 1690000000, ""), body(512, 1)},
		{header("etc/odd", tar.TypeReg, 0o640, 1000, 1000, 1025, 1690000001, ""), body(1025, 9)},
		{header("empty", tar.TypeReg, 0o644, 0, 0, 0, 0, ""), nil},
		{header("fifo1", tar.TypeFifo, 0o644, 0, 0, 0, 1700000000, ""), nil},
		{header("hl3", tar.TypeReg, 0o644, 0, 0, 2, 1700000000, ""), []byte("hl")},
		{header("hl1", tar.TypeLink, 0o644, 0, 0, 0, 1700000000, "hl3"), nil},
		{header("lnk", tar.TypeSymlink, 0o777, 0, 0, 0, 1700000000, "../some/target"), nil},
		{header("longdir/", tar.TypeDir, 0o755, 0, 0, 0, 1700000000, ""), nil},
		{header("longdir/"+rep("g", 110), tar.TypeReg, 0o644, 0, 0, 1, 1700000000, ""), []byte("g")},
		{header("longdir/"+rep("d", 94)+"/", tar.TypeDir, 0o755, 0, 0, 0, 1700000000, ""), nil},
		{header("ünï.txt", tar.TypeReg, 0o644, 0, 0, 0, 1700000000, ""), nil},
	}
}

func writeStream(w io.Writer, items []item) {
	tw := tar.NewWriter(w)
	for _, it := range items {
		must(tw.WriteHeader(it.h))
		if len(it.body) > 0 {
			_, err := tw.Write(it.body)
			must(err)
		}
	}
	must(tw.Close())
}

const (
	keyFileAttr     = "MSWINDOWS.fileattr"
	keySDRaw        = "MSWINDOWS.rawsd"
	keyCreationTime = "LIBARCHIVE.creationtime"
	// Self-relative security descriptors, base64, as in BuildKit util/winlayers/differ.go.
	sdDir  = "AQAEgBQAAAAkAAAAAAAAADAAAAABAgAAAAAABSAAAAAgAgAAAQEAAAAAAAUSAAAAAgCoAAcAAAAAAxgA/wEfAAECAAAAAAAFIAAAACACAAAAAxQA/wEfAAEBAAAAAAAFEgAAAAAAGAD/AR8AAQIAAAAAAAUgAAAAIAIAAAALFAAAAAAQAQEAAAAAAAMAAAAAAAMYAKkAEgABAgAAAAAABSAAAAAhAgAAAAIYAAQAAAABAgAAAAAABSAAAAAhAgAAAAIYAAIAAAABAgAAAAAABSAAAAAhAgAA"
	sdFile = "AQAEgBQAAAAkAAAAAAAAADAAAAABAgAAAAAABSAAAAAgAgAAAQEAAAAAAAUSAAAAAgBMAAMAAAAAABgA/wEfAAECAAAAAAAFIAAAACACAAAAABQA/wEfAAEBAAAAAAAFEgAAAAAAGACpABIAAQIAAAAAAAUgAAAAIQIAAA=="
)

// winHeader applies the Windows header rules (attributes, mode bits, creation time, PAX).
func winHeader(h *tar.Header, withSD bool) {
	if h.PAXRecords == nil {
		h.PAXRecords = map[string]string{}
	}
	switch h.Typeflag {
	case tar.TypeDir:
		h.Mode |= 1 << 14
		h.PAXRecords[keyFileAttr] = "16"
		if withSD {
			h.PAXRecords[keySDRaw] = sdDir
		}
	case tar.TypeReg:
		h.Mode |= 1 << 15
		h.PAXRecords[keyFileAttr] = "32"
		if withSD {
			h.PAXRecords[keySDRaw] = sdFile
		}
	}
	if !h.ModTime.IsZero() {
		h.PAXRecords[keyCreationTime] = fmt.Sprintf("%d.%d", h.ModTime.Unix(), h.ModTime.Nanosecond())
	}
	h.Format = tar.FormatPAX
}

// windowsLayer rewrites a tar stream the way BuildKit's makeWindowsLayer does, at a fixed time.
func windowsLayer(w io.Writer, r io.Reader, epoch int64) {
	tr := tar.NewReader(r)
	tw := tar.NewWriter(w)
	for _, name := range []string{"Hives", "Files"} {
		h := &tar.Header{Name: name, Typeflag: tar.TypeDir, ModTime: time.Unix(epoch, 0)}
		winHeader(h, false)
		must(tw.WriteHeader(h))
	}
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		must(err)
		h.Name = "Files/" + h.Name
		if h.Linkname != "" {
			h.Linkname = "Files/" + h.Linkname
		}
		winHeader(h, true)
		must(tw.WriteHeader(h))
		if h.Size > 0 {
			_, err := io.Copy(tw, tr)
			must(err)
		}
	}
	must(tw.Close())
}

func streamCases() (plain []streamCase, win []streamCase) {
	items := layer()
	var entries []entry
	for _, it := range items {
		entries = append(entries, toEntry(it.h, it.body))
	}
	var buf bytes.Buffer
	writeStream(&buf, items)
	sum := sha256.Sum256(buf.Bytes())
	plain = append(plain, streamCase{ID: "layer", Entries: entries, Tar: hex.EncodeToString(buf.Bytes()), Sha256: hex.EncodeToString(sum[:])})

	var empty bytes.Buffer
	writeStream(&empty, nil)
	sum = sha256.Sum256(empty.Bytes())
	plain = append(plain, streamCase{ID: "empty", Entries: []entry{}, Tar: hex.EncodeToString(empty.Bytes()), Sha256: hex.EncodeToString(sum[:])})

	for _, epoch := range []int64{0, 1700000000} {
		for _, src := range []struct {
			id      string
			items   []item
			entries []entry
		}{{"layer", items, entries}, {"empty", nil, []entry{}}} {
			var in, out bytes.Buffer
			writeStream(&in, src.items)
			windowsLayer(&out, &in, epoch)
			sum := sha256.Sum256(out.Bytes())
			win = append(win, streamCase{ID: fmt.Sprintf("%s_epoch%d", src.id, epoch), Epoch: epoch, Entries: src.entries,
				Tar: hex.EncodeToString(out.Bytes()), Sha256: hex.EncodeToString(sum[:])})
		}
	}
	return plain, win
}

func dump(path string, v any) {
	b, err := json.MarshalIndent(v, "", " ")
	must(err)
	must(os.WriteFile(path, append(b, '\n'), 0o644))
}

func main() {
	hc := headerCases()
	dump("headers.json", map[string]any{"go": runtime.Version(), "cases": hc})
	plain, win := streamCases()
	dump("streams.json", map[string]any{"go": runtime.Version(), "cases": plain})
	dump("windows.json", map[string]any{"go": runtime.Version(), "cases": win})
}
