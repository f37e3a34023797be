"""Reading printed result tables back (test helper): the numbers a reader sees must be the ones
in results.json, in the formats of the README's tables."""
import re


def printed_rows(text: str) -> dict:
    """method -> cells of each row of a results table in `text`, terminal (`report.table_text`,
    cells split on runs of spaces) or markdown (`| a | b |`)."""
    lines = text.splitlines()
    header = next(i for i, l in enumerate(lines) if "test acc (%)" in l)
    out = {}
    for line in lines[header + 1:]:
        if not line.strip() or set(line.replace("|", "").strip()) <= {"-", " "}:
            if out:
                break
            continue
        cells = ([c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|")
                 else re.split(r"\s{2,}", line.strip()))
        out[cells[0]] = cells
    return out


def assert_table_shows(text: str, rows) -> None:
    """Every row of `rows` (results.json) is printed in `text` with its accuracy (%, 2 places),
    params and MACs (thousands separators) and sparsity (%, 1 place)."""
    printed = printed_rows(text)
    assert [r["method"] for r in rows] == list(printed), (list(printed), text)
    for row in rows:
        cells = printed[row["method"]]
        assert cells[1] == f"{100 * row['accuracy']:.2f}", (cells, row)
        assert cells[2].replace(",", "") == str(row["params"]), (cells, row)
        assert cells[3].replace(",", "") == str(row["macs"]), (cells, row)
        assert cells[7] == f"{100 * row['sparsity']:.1f}", (cells, row)
