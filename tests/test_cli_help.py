import pytest

COMMANDS = ["launch", "worker", "status", "report", "evaluate", "export", "dashboard", "demo"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(cli, command):
    code, out, _ = cli(command, "--help")
    assert code == 0 and "Usage" in out


def test_top_level_help_lists_every_command(cli):
    code, out, _ = cli("--help")
    assert code == 0 and all(command in out for command in COMMANDS)


def test_unknown_option_is_a_usage_error(cli):
    code, _, err = cli("launch", "spec.yaml", "--trials", "3")
    assert code == 2 and "--trials" in err
