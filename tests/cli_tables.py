"""Parse the tables that the ``spinal`` command prints."""


def table_rows(output: str) -> list[list[str]]:
    """Return the cells of the first table: the lines between its dashed rule and the next blank line."""
    lines = output.splitlines()
    rule = next(index for index, line in enumerate(lines) if line.startswith("---"))
    rows = []
    for line in lines[rule + 1 :]:
        if not line.strip():
            break
        rows.append(line.split())
    return rows
