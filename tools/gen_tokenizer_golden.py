#!/usr/bin/env python3
"""Write the golden token ids of tools/tokenizer_strings.py, as Hugging Face `tokenizers` encodes
them with the real DeepSeek tokenizer (no BOS added):
    python3 tools/gen_tokenizer_golden.py testdata/tokenizer.json.gz > testdata/tokenizer_golden.txt
One line per string: the string's UTF-8 bytes in hex, a tab, the ids comma-separated."""
import gzip, os, sys

from tokenizers import Tokenizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tokenizer_strings import STRINGS

with gzip.open(sys.argv[1], "rt", encoding="utf-8") as f:
    tok = Tokenizer.from_str(f.read())
for s in STRINGS:
    ids = tok.encode(s).ids
    if tok.decode(ids, skip_special_tokens=False) != s:
        print("round trip differs:", repr(s), file=sys.stderr)
    print(s.encode().hex() + "\t" + ",".join(map(str, ids)))
