#!/usr/bin/env python3
"""Build the training corpus of the demonstration model from Debian packages (issue 8).

What: downloads the Debian packages of a few public-domain English texts with
`apt-get download` (no installation), unpacks them with `dpkg -x` into a scratch folder,
decodes their storage formats, cleans them (licence and Gutenberg headers/footers, markup,
verse numbers and references, editorial notes, whitespace) and writes

    OUT_DIR/train.txt      the text training may see
    OUT_DIR/valid.txt      the held-out text training never sees
    testdata/heldout.txt   (with --heldout) a 20-40 KB excerpt of valid.txt, whole paragraphs

UTF-8, paragraphs separated by one blank line (verse keeps its line breaks inside a
paragraph), documents one after another in a fixed order. The run is deterministic: the
same packages give byte-identical files.

Sources (Debian bookworm packages) and how each is decoded:
  r-cran-janeaustenr  six Austen novels: R lazy-load database data/Rdata.rdb/.rdx (the .rdx a
                      gzip'd R serialization of the offset index, each .rdb object a 4-byte
                      length + zlib stream of an R XDR serialization holding a character
                      vector of lines), read by the small XDR reader below.
  r-cran-tokenizers   Moby Dick (Gutenberg #2701), the same kind of database; the Gutenberg
                      header/licence before "ETYMOLOGY." and after the END marker are dropped.
  bible-kjv-text      King James Bible in the "bible" program's compressed format; dumped by
  (+ bible-kjv)       the package's own /usr/bin/bible run from the unpacked tree (not
                      installed): `bible -p DIR -l1000 gen1:1-rev22:21`. Verse numbers and the
                      "Book N" chapter headings are removed: one paragraph per chapter, the
                      book name as a title paragraph.
  sword-text-web      World English Bible (with deuterocanon), SWORD zText module: .bzs block
                      index (u32 offset, size, raw size), .bzv verse index (u32 block, u32
                      offset, u16 size), .bzz zlib blocks of OSIS. Footnotes (<note>) and
                      all markup are dropped; paragraphs from the OSIS x-p divs, verse lines
                      from <l>; front matter (preface) and the closing glossary are dropped.
  jargon-text         The Jargon File 4.4.7 (text rendering): the table of contents and the
                      per-letter headword indexes are dropped, {cross-reference} braces and
                      :headword: colons removed.
  dict-devil          The Devil's Dictionary (dictd .dict.dz = gzip): dictd's 00-database
                      entries and the Wiretap edition header before the PREFACE are dropped.
  sword-comm-tdavid   Spurgeon, The Treasury of David, and Matthew Henry's Concise Commentary:
  sword-comm-mhcc     SWORD zCom modules (the same zVerse storage; tdavid with zVerse4's
                      12-byte index records), OSIS. An entry shared by a verse range comes
                      once; Scripture references (with their parentheses and trailing
                      chapter:verse numbers), "Verse 3." labels, titles and outline tables go.
Skipped: dict-gcide (GPL), fortunes.

Held-out rule (valid.txt): for every document the last 2% of its bytes, cut back to a
paragraph boundary (documents: each Austen novel, Moby Dick, the Jargon File, the Devil's
Dictionary, the Treasury of David); for the two Bibles the whole book of Revelation in both
translations, and Matthew Henry's commentary on Revelation, so the held-out text is not
leaked through the parallel translation or the commentary. Austen's and Melville's
held-out parts are the final chapters of each novel.

testdata/heldout.txt: the whole held-out end of Pride and Prejudice, then whole paragraphs
of Moby Dick's and the KJV's held-out parts up to about 32 KB.

Run (as root, any machine with apt; about 10 s; 30.8 MB train, 0.6 MB valid):
    python3 tools/build_corpus.py [--out build/corpus] [--scratch build/corpus-debs]
                                  [--heldout testdata/heldout.txt]
Needs only the Python 3 standard library (tested with Python 3.11.7 on Debian bookworm;
packages r-cran-janeaustenr 1.0.0-1, r-cran-tokenizers 0.3.0-1, bible-kjv(-text) 4.38,
sword-text-web 426.0-1, jargon-text 4.4.7-4.1, dict-devil 1.0-13.1, sword-comm-tdavid 2.1-1,
sword-comm-mhcc 2.0-1).
"""
import argparse, glob, gzip, os, re, struct, subprocess, sys, zlib

PACKAGES = ['r-cran-janeaustenr', 'r-cran-tokenizers', 'bible-kjv-text', 'bible-kjv',
            'sword-text-web', 'jargon-text', 'dict-devil', 'sword-comm-tdavid', 'sword-comm-mhcc']
VALID_FRACTION = 0.02

# ---------------------------------------------------------------------------------------
# R serialization (XDR, versions 2 and 3): just enough to read character vectors
# ---------------------------------------------------------------------------------------
class RReader:
    def __init__(self, data):
        self.d, self.p, self.refs = data, 0, []

    def int(self):
        v = struct.unpack_from('>i', self.d, self.p)[0]
        self.p += 4
        return v

    def length(self):
        n = self.int()
        if n == -1:                            # long vector
            hi, lo = self.int(), self.int()
            n = (hi << 32) + lo
        return n

    def parse(self):
        if self.d[:2] != b'X\n':
            raise ValueError('not an XDR R serialization')
        self.p = 2
        version = self.int()
        self.int(); self.int()                 # writer's and minimal R versions
        if version == 3:
            n = self.int()                     # native encoding name
            self.p += n
        return self.item()

    def item(self):
        flags = self.int()
        t = flags & 0xFF
        has_attr, has_tag = flags & (1 << 9), flags & (1 << 10)
        if t in (254, 253, 252, 251, 250, 242, 241):   # NULL, environments, markers
            return None
        if t == 255:                                     # reference
            i = flags >> 8
            return self.refs[(i or self.int()) - 1]
        if t in (247, 248, 249):                         # persistent / package / namespace
            self.int()
            v = [self.item() for _ in range(self.int())]
            self.refs.append(v)
            return v
        if t == 1:                                       # symbol
            v = ('sym', self.item())
            self.refs.append(v)
            return v
        if t == 4:                                       # environment
            env = {}
            self.refs.append(env)
            self.int(); self.item()
            env['frame'] = self.item()
            self.item(); self.item()
            return env
        if t in (2, 3, 5, 6, 17, 239, 240):              # pairlist-like: [(tag, value), ...]
            if has_attr: self.item()
            tag = self.item() if has_tag else None
            car, cdr = self.item(), self.item()
            out = [(tag[1] if isinstance(tag, tuple) else tag, car)]
            if isinstance(cdr, list):
                out += cdr
            return out
        if t == 238:                                     # ALTREP: class, state, attributes
            info, state, _ = self.item(), self.item(), self.item()
            return ('altrep', info, state)
        if t == 9:                                       # CHARSXP
            n = self.int()
            if n == -1:
                return None
            s = self.d[self.p:self.p + n]
            self.p += n
            return s.decode('latin-1' if (flags >> 12) & 4 else 'utf-8', 'replace')
        if t in (10, 13):
            n = self.length(); v = struct.unpack_from('>%di' % n, self.d, self.p); self.p += 4 * n
        elif t == 14:
            n = self.length(); v = struct.unpack_from('>%dd' % n, self.d, self.p); self.p += 8 * n
        elif t == 15:
            n = self.length(); v = struct.unpack_from('>%dd' % (2 * n), self.d, self.p); self.p += 16 * n
        elif t == 24:
            n = self.length(); v = self.d[self.p:self.p + n]; self.p += n
        elif t in (16, 19, 20):                          # STRSXP, VECSXP, EXPRSXP
            v = [self.item() for _ in range(self.length())]
        elif t == 25:
            v = None
        else:
            raise ValueError('R serialization type %d not supported' % t)
        if has_attr:
            return ('attr', v, self.item())
        return v


def r_value(v):
    return v[1] if isinstance(v, tuple) and v and v[0] == 'attr' else v


def r_names(v):
    if isinstance(v, tuple) and v[0] == 'attr':
        for tag, val in v[2]:
            if tag == 'names':
                return val
    return None


def read_lazyload(prefix):
    """{name: value} of an R lazy-load database prefix.rdb / prefix.rdx."""
    idx = RReader(gzip.decompress(open(prefix + '.rdx', 'rb').read())).parse()
    idx = dict(zip(r_names(idx), r_value(idx)))
    db = open(prefix + '.rdb', 'rb').read()
    out = {}
    for name, off in zip(r_names(idx['variables']), r_value(idx['variables'])):
        o, n = [int(x) for x in r_value(off)]
        blob = db[o:o + n]                     # 4-byte big-endian raw length + zlib stream
        out[name] = r_value(RReader(zlib.decompress(blob[4:])).parse())
    return out

# ---------------------------------------------------------------------------------------
# Cleaning helpers
# ---------------------------------------------------------------------------------------
def norm_ws(s):
    return re.sub(r'[ \t\u00a0\u2000-\u200a\u202f]+', ' ', s.replace('\ufeff', '')).strip()


def paragraphs_from_lines(lines, base_indent=0):
    """Blank-line separated paragraphs; wrapped prose lines are joined with spaces, a
    paragraph whose lines are all indented deeper than base_indent (verse, quotations set
    off) keeps its line breaks."""
    out, cur = [], []

    def flush():
        if not cur:
            return
        ind = [len(l) - len(l.lstrip(' ')) for l in cur]
        if len(cur) > 1 and min(ind) > base_indent:
            p = '\n'.join(norm_ws(l) for l in cur)
        else:
            p = norm_ws(' '.join(cur))
        if p:
            out.append(p)
        cur.clear()

    for l in lines:
        l = l.rstrip().replace('\t', '    ')
        if l.strip():
            cur.append(l)
        else:
            flush()
    flush()
    return out


def strip_italics(p):
    return re.sub(r'(?<![A-Za-z0-9_])_([^_\n]+?)_(?![A-Za-z0-9_])', r'\1', p)

# ---------------------------------------------------------------------------------------
# Sources: each returns [(document name, [paragraph, ...]), ...]
# ---------------------------------------------------------------------------------------
AUSTEN = [('sensesensibility', 'Sense and Sensibility'), ('prideprejudice', 'Pride and Prejudice'),
          ('mansfieldpark', 'Mansfield Park'), ('emma', 'Emma'),
          ('northangerabbey', 'Northanger Abbey'), ('persuasion', 'Persuasion')]


def src_austen(root):
    data = read_lazyload(root + '/usr/lib/R/site-library/janeaustenr/data/Rdata')
    docs = []
    for key, title in AUSTEN:
        lines = [l or '' for l in data[key]]
        if key == 'northangerabbey':           # editor's "A NOTE ON THE TEXT" at the end
            lines = lines[:lines.index('A NOTE ON THE TEXT')]
        paras = [strip_italics(p) for p in paragraphs_from_lines(lines)]
        docs.append((title, paras))
    return docs


def src_moby(root):
    data = read_lazyload(root + '/usr/lib/R/site-library/tokenizers/data/Rdata')
    text = data['mobydick'][0].replace('\r\n', '\n').lstrip('\ufeff')
    lines = text.split('\n')
    start = lines.index('ETYMOLOGY.')
    end = next(i for i, l in enumerate(lines) if l.startswith('*** END OF THIS PROJECT GUTENBERG'))
    lines = ['MOBY DICK; OR THE WHALE', '', 'By Herman Melville', ''] + lines[start:end]
    paras = [strip_italics(p) for p in paragraphs_from_lines(lines)]
    while paras and paras[-1].startswith('End of Project Gutenberg'):
        paras.pop()
    return [('Moby Dick', paras)]


def src_kjv(root):
    exe = root + '/usr/bin/bible'
    out = subprocess.run([exe, '-p', root + '/usr/lib', '-l1000', 'gen1:1-rev22:21'],
                         check=True, capture_output=True, env={'PATH': '/usr/bin:/bin'})
    text = out.stdout.decode('utf-8')
    books, book, verses = [], None, []

    def flush():
        if verses:
            books[-1][1].append(norm_ws(' '.join(verses)))
            verses.clear()

    for l in text.split('\n'):
        m = re.match(r'^(\S.*?) (\d+)$', l)
        v = re.match(r'^\s+\d+ (.*)$', l)
        if m:
            flush()
            if m.group(1) != book:
                book = m.group(1)
                books.append((book, [book]))
        elif v:
            verses.append(v.group(1))
        elif l.strip():
            raise ValueError('unexpected line in the KJV dump: %r' % l)
    flush()
    assert len(books) == 66, len(books)
    return books


def sword_zverse(moddir, ext='bz', entry=10):
    """The entries of a SWORD zText/zCom module (both testaments) in versification order, as
    [((testament, block), text)]; an entry shared by several verses (a commentary on a range)
    comes once. entry: the verse index record size, 10 (u16 size) or 12 (zVerse4, u32 size)."""
    out, seen = [], set()
    for t in ('ot', 'nt'):
        if not os.path.exists(os.path.join(moddir, t + '.' + ext + 's')):
            continue
        bzs = open(os.path.join(moddir, t + '.' + ext + 's'), 'rb').read()
        bzv = open(os.path.join(moddir, t + '.' + ext + 'v'), 'rb').read()
        bzz = open(os.path.join(moddir, t + '.' + ext + 'z'), 'rb').read()
        blocks = [struct.unpack_from('<III', bzs, i) for i in range(0, len(bzs), 12)]
        cache = {}
        for i in range(0, len(bzv) - entry + 1, entry):
            b, o = struct.unpack_from('<II', bzv, i)
            n = struct.unpack_from('<H' if entry == 10 else '<I', bzv, i + 8)[0]
            if n == 0 or (t, b, o) in seen:
                continue
            seen.add((t, b, o))
            if b not in cache:
                off, size, _ = blocks[b]
                cache[b] = zlib.decompress(bzz[off:off + size])
            out.append(((t, b), cache[b][o:o + n].decode('utf-8')))
    return out


def sword_ztext(moddir):
    return ' '.join(text for _, text in sword_zverse(moddir))


def strip_commentary(s):
    """OSIS of a commentary: drops Scripture references (with their parentheses and the bare
    chapter:verse numbers around them), "Verse 3." labels, titles and outline tables."""
    s = re.sub(r'<table>.*?</table>', '', s, flags=re.S)
    s = re.sub(r'<title\b[^>]*>.*?</title>', '', s, flags=re.S)
    s = re.sub(r'<hi type="bold">\s*Verses?\s[^<]*</hi>', '', s)
    ref = r'<reference\b[^>]*>[^<]*</reference>'
    s = re.sub(r'\(\s*(?:see |comp\. |compare )?(?:%s[\s,;.:\-\u2013]*(?:and\s*)?)+\)' % ref, '', s)
    s = re.sub(r'[,;:]?\s*(?:%s(?:[\s,;:\-\u2013]*\d+(?::\d+)?(?:[-\u2013]\d+)?)*[\s,;]*)+' % ref,
               ' ', s)
    return s


def tidy_punct(p):
    p = re.sub(r' +([.,;:!?])', r'\1', p)
    p = re.sub(r'([,;:])(?=[.;:!?])', '', p)
    return p


def src_commentaries(root):
    docs = []
    base = root + '/usr/share/sword/modules/comments/zcom/'
    # Spurgeon, The Treasury of David (Psalms): one document
    ents = sword_zverse(base + 'tdavid', 'cz', 12)
    paras = [tidy_punct(p) for _, t in ents for p in osis_to_paragraphs(strip_commentary(t))]
    docs.append(('Treasury of David', paras))
    # Matthew Henry's Concise Commentary: one document per Bible book (zCom block)
    books = {}
    for key, t in sword_zverse(base + 'mhcc', 'bz', 10):
        books.setdefault(key, []).extend(tidy_punct(p) for p in osis_to_paragraphs(strip_commentary(t)))
    keys = sorted(books, key=lambda k: (k[0] != 'ot', k[1]))
    for k in keys:
        docs.append(('mhcc ' + ('Revelation' if k == keys[-1] else '%s%d' % k), books[k]))
    return docs


def osis_to_paragraphs(s):
    # footnotes and cross references go; a note glued between two words leaves a space
    s = re.sub(r'<note\b.*?</note>(?=(<w\b|\w)?)', lambda m: ' ' if m.group(1) else '', s,
               flags=re.S)
    P = '\x00'                                   # paragraph break marker
    s = re.sub(r'<title\b[^>]*>', P, s)
    s = s.replace('</title>', P)
    s = re.sub(r'<(?:div|lg|chapter|speaker|list)\b[^>]*>', P, s)
    s = s.replace('</speaker>', P)
    s = re.sub(r'<lb\b[^>]*>', P, s)
    s = re.sub(r'<l\b[^>]*eID[^>]*>', '\n', s)   # end of a verse line
    s = re.sub(r'<item\b[^>]*>', P, s)
    s = re.sub(r'<[^>]+>', '', s)                # all other markup
    s = s.replace('&amp;', '&').replace('&lt;', '<').replace('&gt;', '>').replace('&quot;', '"')
    out = []
    for p in s.split(P):
        lines = [norm_ws(l) for l in p.split('\n')]
        p = '\n'.join(l for l in lines if l)
        if p:
            out.append(p)
    return out


def src_web(root):
    s = sword_ztext(root + '/usr/share/sword/modules/texts/ztext/engWEB2015eb')
    s = s[:s.index('type="glossary"')]
    s = s[:s.rindex('<')]
    books = []
    pieces = re.split(r'(<div\b[^>]*\bosisID="[^"]+"[^>]*\bsID="[^"]+"[^>]*type="book"[^>]*/>)', s)
    for i in range(1, len(pieces), 2):
        name = re.search(r'osisID="([^"]+)"', pieces[i]).group(1)
        books.append((name, osis_to_paragraphs(pieces[i + 1])))
    assert books[-1][0] == 'Rev', books[-1][0]
    return books


def src_jargon(root):
    text = gzip.decompress(open(root + '/usr/share/doc/jargon-text/jargon.txt.gz', 'rb').read())
    lines = text.decode('utf-8').split('\n')
    start = [i for i, l in enumerate(lines) if l.strip() == 'Welcome to the Jargon File'][1]
    lines = lines[start:]
    raw = paragraphs_from_lines(lines, base_indent=3)
    # drop the per-letter headword indexes: runs of 3+ short one-line paragraphs without
    # sentence punctuation (the entries themselves follow as ":word: ..." paragraphs)
    short = [('\n' not in p and len(p) < 60 and not re.search(r'[.!?:;,"”)]$', p)
              and not p.startswith(':')) for p in raw]
    keep = [True] * len(raw)
    i = 0
    while i < len(raw):
        j = i
        while j < len(raw) and short[j]:
            j += 1
        if j - i >= 3:
            for k in range(i, j):
                keep[k] = False
        i = max(j, i + 1)
    paras = []
    for p, k in zip(raw, keep):
        if not k or re.search('[\u2500-\u257f]', p):   # also the box-drawn tables
            continue
        p = re.sub(r'\{([^{}]*)\}', r'\1', p)
        p = re.sub(r'^:([^:\n]+):', r'\1:', p)
        paras.append(p)
    return [('The Jargon File', paras)]


def src_devil(root):
    text = gzip.decompress(open(root + '/usr/share/dictd/devil.dict.dz', 'rb').read())
    lines = text.decode('utf-8').split('\n')
    start = next(i for i, l in enumerate(lines) if l.strip() == 'PREFACE')
    lines = ["THE DEVIL'S DICTIONARY", '', 'by Ambrose Bierce', ''] + lines[start:]
    paras = paragraphs_from_lines(lines)
    if paras and paras[-1] == 'abcdefghijklmnopqrstuvwxyz':
        paras.pop()
    paras = [re.sub(r'\{([^{}]*)\}', r'\1', strip_italics(p)) for p in paras]
    return [("The Devil's Dictionary", paras)]

# ---------------------------------------------------------------------------------------
def split_tail(paras, frac=VALID_FRACTION):
    """(train, valid): valid = the last frac of the bytes, cut back to a paragraph start."""
    total = sum(len(p.encode()) + 2 for p in paras)
    acc, i = 0, len(paras)
    while i > 0 and acc < frac * total:
        i -= 1
        acc += len(paras[i].encode()) + 2
    return paras[:i], paras[i:]


def fetch(scratch):
    os.makedirs(scratch, exist_ok=True)
    root = os.path.join(scratch, 'root')
    debs = sorted(glob.glob(os.path.join(scratch, '*.deb')))
    have = {os.path.basename(d).split('_')[0] for d in debs}
    missing = [p for p in PACKAGES if p not in have]
    if missing:
        r = subprocess.run(['apt-get', 'download'] + missing, cwd=scratch)
        if r.returncode:
            subprocess.run(['apt-get', 'update'], check=True)
            subprocess.run(['apt-get', 'download'] + missing, cwd=scratch, check=True)
        debs = sorted(glob.glob(os.path.join(scratch, '*.deb')))
    for d in debs:
        subprocess.run(['dpkg', '-x', d, root], check=True)
    return root, debs


def main():
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--out', default=os.path.join(here, 'build', 'corpus'))
    ap.add_argument('--scratch', default=os.path.join(here, 'build', 'corpus-debs'))
    ap.add_argument('--heldout', help='write the held-out excerpt here (testdata/heldout.txt)')
    args = ap.parse_args()
    root, debs = fetch(args.scratch)

    sources = [('austen', src_austen), ('moby', src_moby), ('kjv', src_kjv), ('web', src_web),
               ('jargon', src_jargon), ('devil', src_devil), ('comm', src_commentaries)]
    train, valid, summary, byname = [], [], [], {}
    for sname, fn in sources:
        tr_b = va_b = tr_l = va_l = 0
        for doc, paras in fn(root):
            if sname in ('kjv', 'web') or doc.startswith('mhcc'):
                tr, va = (([], paras) if doc in ('Revelation', 'Rev', 'mhcc Revelation')
                          else (paras, []))
            else:
                tr, va = split_tail(paras)
            byname[(sname, doc)] = va
            for dst, ps in ((train, tr), (valid, va)):
                if ps:
                    dst.append('\n\n'.join(ps))
            tr_b += sum(len(p.encode()) + 2 for p in tr); tr_l += sum(p.count('\n') + 2 for p in tr)
            va_b += sum(len(p.encode()) + 2 for p in va); va_l += sum(p.count('\n') + 2 for p in va)
        summary.append((sname, tr_b, tr_l, va_b, va_l))

    os.makedirs(args.out, exist_ok=True)
    for name, docs in (('train.txt', train), ('valid.txt', valid)):
        with open(os.path.join(args.out, name), 'w', encoding='utf-8', newline='\n') as f:
            f.write('\n\n'.join(docs) + '\n')

    if args.heldout:
        ex = list(byname[('austen', 'Pride and Prejudice')])
        for key, budget in ((('moby', 'Moby Dick'), 24000), (('kjv', 'Revelation'), 32000)):
            n = sum(len(p.encode()) + 2 for p in ex)
            for p in byname[key]:
                if n + len(p.encode()) + 2 > budget:
                    break
                ex.append(p)
                n += len(p.encode()) + 2
        with open(args.heldout, 'w', encoding='utf-8', newline='\n') as f:
            f.write('\n\n'.join(ex) + '\n')

    print('packages: ' + ' '.join(os.path.basename(d) for d in debs))
    print('%-8s %12s %9s %12s %9s' % ('source', 'train bytes', 'lines', 'valid bytes', 'lines'))
    for s, a, b, c, d in summary:
        print('%-8s %12d %9d %12d %9d' % (s, a, b, c, d))
    for name in ('train.txt', 'valid.txt') + ((args.heldout,) if args.heldout else ()):
        p = name if os.path.isabs(name) or name == args.heldout else os.path.join(args.out, name)
        data = open(p, 'rb').read()
        print('%s: %d bytes, %d lines' % (p, len(data), data.count(b'\n')))


if __name__ == '__main__':
    main()
