"""badnet_jax.errors: every error badnet-jax raises on purpose is one family a caller can catch at once, and its
message names arguments and config fields in a form a command-line tool can show as its flags."""

from __future__ import annotations

from badnet_jax import BadNetError, CheckpointError, ConfigError, DataFileError, ModelFileError, OutputError
from badnet_jax.errors import NO_VALUE, arg


def test_all_errors_share_one_family():
    for error in (ModelFileError, DataFileError, ConfigError, CheckpointError, OutputError):
        assert issubclass(error, BadNetError)
        err = error("x", field="f")
        assert str(err) == "x" and err.field == "f"


def test_a_message_names_fields_and_renders_them_for_any_reader():
    err = ConfigError(f"{arg('out_dir', '/tmp/o')}: full; or {arg('checkpoints', False)}, or raise {arg('chunk')}",
                      field="out_dir")
    assert str(err) == "out_dir=/tmp/o: full; or checkpoints=False, or raise chunk" and err.field == "out_dir"
    shown = err.render(lambda name, value: f"<{name}>" if value is NO_VALUE else f"<{name} {value!r}>")
    assert shown == "<out_dir '/tmp/o'>: full; or <checkpoints False>, or raise <chunk>"
