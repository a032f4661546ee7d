from inkpipe.pipeline.text import format_table


def test_format_table_aligns_columns_and_sets_the_footer_apart() -> None:
    text = format_table(
        ("fragment", "F0.5", "tp"),
        [("1", "0.5000", "10"), ("long-id", "1.0000", "3")],
        footer=[("mean", "0.7500", "")],
    )
    assert text.splitlines() == [
        "fragment    F0.5  tp",
        "--------  ------  --",
        "1         0.5000  10",
        "long-id   1.0000   3",
        "--------  ------  --",
        "mean      0.7500",  # no trailing spaces
    ]


def test_format_table_left_aligned_and_empty() -> None:
    assert format_table(("a", "bb"), [("xyz", "1")], align="ll").splitlines() == [
        "a    bb",
        "---  --",
        "xyz  1",
    ]
    assert format_table(("a", "bb"), []) == "a  bb\n-  --"
