"""script/test's workers: which tests must share a worker (tests/fixtures/scheduling.py)."""

from tests.fixtures.scheduling import work_unit


def test_a_modules_tests_share_one_unit_so_its_module_fixtures_are_built_once():
    assert work_unit("tests/test_generate.py::test_a[x-1]") == "tests/test_generate.py"
    assert work_unit("tests/test_generate.py::TestClass::test_b") == "tests/test_generate.py"


def test_a_simulated_cards_checks_share_the_unit_of_their_card_run_and_cards_are_separate_units():
    setup = work_unit("tests/test_simulated_cards.py::test_setup_serves_the_class_or_refuses_with_the_reason[full-Predictor-H100]")
    served = work_unit("tests/test_simulated_cards.py::test_every_request_kind_is_served[full-Predictor-H100]")
    other_card = work_unit("tests/test_simulated_cards.py::test_every_request_kind_is_served[full-Predictor-H200]")
    assert setup == served == "tests/test_simulated_cards.py[full-Predictor-H100]"
    assert other_card != setup
    assert work_unit("tests/test_simulated_cards.py::test_unparametrised") == "tests/test_simulated_cards.py"
